"""The vLLM plugin on checkpoints other than plain Baichuan2: Baichuan-1, broken weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from langchain_baichuan2.loading import CheckpointError
from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM
from langchain_baichuan2.testing import make_tiny_checkpoint
from tests.integration_tests.tiny import padded_tokenizer
from tests.vllm.conftest import VLLM_KWARGS

PROMPT = [195, 300, 301, 302, 303, 196]


def rewrite_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def native_greedy(folder, prompt, steps, *, norm_head):
    """Greedy ids by full forward passes of the native model on the stored weights."""
    model = BaichuanForCausalLM(BaichuanConfig.from_pretrained(folder)).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    if norm_head:
        model.normalize_head()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def vllm_greedy(folder, prompt, steps):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(str(folder), dtype="float32", **VLLM_KWARGS)
    try:
        (result,) = llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)],
            SamplingParams(temperature=0, max_tokens=steps),
            use_tqdm=False,
        )
        return list(result.outputs[0].token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def baichuan1_7b(tmp_path_factory):
    """A tiny Baichuan-7B (Baichuan-1): RoPE, its architecture spelling, vocab 64,000."""
    seed = make_tiny_checkpoint(tmp_path_factory.mktemp("seed"), "7b", hidden_size=64)
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("baichuan1"),
        "7b",
        hidden_size=128,
        num_attention_heads=2,
        tokenizer_model=padded_tokenizer(seed, 64000),
    )
    state = load_file(folder / "model.safetensors")
    # Rows of very different norms: normalizing them changes which token wins.
    state["lm_head.weight"] *= torch.linspace(0.2, 5.0, 64000)[:, None]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    rewrite_config(folder, architectures=["BaiChuanForCausalLM"])
    return folder


@pytest.mark.slow
def test_baichuan1_loads_with_its_head_as_stored(baichuan1_7b):
    expected = native_greedy(baichuan1_7b, PROMPT, 12, norm_head=False)
    # The test means something: Baichuan2's NormHead would pick other tokens here.
    assert native_greedy(baichuan1_7b, PROMPT, 12, norm_head=True) != expected
    assert vllm_greedy(baichuan1_7b, PROMPT, 12) == expected


@pytest.fixture(scope="module")
def int32_w_pack(tmp_path_factory):
    """A tiny checkpoint whose first W_pack is stored as int32 (a broken export)."""
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("int32"), "13b", hidden_size=128, num_attention_heads=2
    )
    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.W_pack.weight"
    state[name] = (state[name] * 100).to(torch.int32)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_non_float_weight_is_refused_naming_the_tensor(int32_w_pack):
    from vllm import LLM

    # Raised while vLLM validates its ModelConfig (which wraps it), before any engine
    # process starts.
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.W_pack\.weight'.*int32"):
        LLM(str(int32_w_pack), dtype="float32", **VLLM_KWARGS)


def test_load_weights_refuses_a_non_float_weight_that_skipped_the_folder_check(
    int32_w_pack, monkeypatch
):
    """A hub id is downloaded by the workers, after the folder check could run."""
    from vllm import LLM
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    from langchain_baichuan2.vllm_plugin import model_config

    monkeypatch.setattr(model_config, "check_checkpoint", lambda folder: None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    name = r"'model\.layers\.0\.self_attn\.W_pack\.weight'"
    try:
        with pytest.raises(CheckpointError, match=name + r".*declares no quantization"):
            LLM(str(int32_w_pack), dtype="float32", **VLLM_KWARGS)
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()
