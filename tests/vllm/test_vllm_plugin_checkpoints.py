"""The vLLM plugin on checkpoints other than plain Baichuan2: Baichuan-1, broken weights."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.loading.checkpoint import (
    CheckpointError,
    check_checkpoint,
    expected_names,
    expected_shapes,
)
from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM
from langchain_baichuan2.testing import make_tiny_checkpoint
from langchain_baichuan2.vllm_plugin import model as plugin_model
from tests.vllm.conftest import VLLM_KWARGS, serve_command

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
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("baichuan1"),
        "7b",
        hidden_size=128,
        num_attention_heads=2,
        vocab_size=64000,
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


# -- every tensor present, none extra: the folder check's error on every vLLM path ----------

UP = "model.layers.1.mlp.up_proj.weight"
EXTRA = "model.layers.0.mlp.extra_proj.weight"


def tiny_13b(path):
    return make_tiny_checkpoint(path, "13b", hidden_size=128, num_attention_heads=2)


@pytest.fixture(scope="module", params=["missing", "extra"])
def broken(request, tmp_path_factory):
    """A checkpoint without ``up_proj`` of layer 1, or with a tensor Baichuan2 has not."""
    folder = tiny_13b(tmp_path_factory.mktemp(request.param))
    state = load_file(folder / "model.safetensors")
    if request.param == "missing":
        del state[UP]
    else:
        state[EXTRA] = torch.zeros(4, 128)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def folder_error(folder):
    """The message ``check_checkpoint`` (the native loader's check) gives for ``folder``."""
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(folder)
    message = str(error.value)
    assert (UP if "missing" in folder.name else EXTRA) in message
    return message


def test_backend_vllm_refuses_it_before_vllm_starts(broken, monkeypatch):
    from vllm.v1.engine.async_llm import AsyncLLM

    def start(*args, **kwargs):
        pytest.fail("vLLM started on a broken checkpoint")

    monkeypatch.setattr(AsyncLLM, "from_engine_args", start)
    model = ChatBaichuan2(model=str(broken), backend="vllm", vllm_kwargs=VLLM_KWARGS)
    with pytest.raises(CheckpointError) as error:
        model.invoke("Hi")
    assert str(error.value) == folder_error(broken)


def test_llm_refuses_a_local_folder_before_any_engine_starts(broken):
    from vllm import LLM

    # vLLM's config validation wraps the plugin hook's CheckpointError, message whole.
    with pytest.raises(ValueError) as error:
        LLM(str(broken), dtype="float32", **VLLM_KWARGS)
    assert folder_error(broken) in str(error.value)


@pytest.mark.slow
def test_vllm_serve_exits_with_the_error_before_any_engine_starts(broken):
    command = serve_command(broken) + ["--dtype", "float32", "--max-model-len", "2048"]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert run.returncode != 0
    last_lines = "\n".join(run.stderr.splitlines()[-3:])
    assert folder_error(broken) in last_lines, run.stderr[-3000:]
    assert "EngineCore" not in run.stderr  # no engine process was started


@pytest.mark.slow
def test_load_weights_refuses_it_when_the_folder_check_was_skipped(broken, monkeypatch):
    """A model id is downloaded by the workers, after the folder check could run."""
    from vllm import LLM
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    from langchain_baichuan2.vllm_plugin import model_config

    monkeypatch.setattr(model_config, "check_checkpoint", lambda folder: None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    try:
        with pytest.raises(CheckpointError) as error:
            LLM(str(broken), dtype="float32", **VLLM_KWARGS)
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()
    assert str(error.value) == folder_error(broken)


class PluginParameters(nn.Module):
    """The plugin model's parameter names and shapes on one rank, without a vLLM engine.

    ``load_weights`` is the plugin's own; the merged ``gate_up_proj`` takes its halves
    through a ``weight_loader`` as vLLM's ``MergedColumnParallelLinear`` does.
    """

    load_weights = plugin_model.BaichuanForCausalLM.load_weights

    def __init__(self, folder):
        super().__init__()
        self.config = BaichuanConfig.from_pretrained(folder)
        self.model_name = str(folder)
        self.quant_config = None
        self.norm_head = self.config.norm_head
        shapes = expected_shapes(self.config)
        self.weights = {}
        for name in expected_names(self.config):
            shape = shapes.get(name) or shapes[name.split(".", 3)[-1]]
            if ".up_proj." in name:
                continue
            if ".gate_proj." in name:
                name = name.replace(".gate_proj.", ".gate_up_proj.")
                shape = (2 * shape[0], shape[1])
                self.weights[name] = self.merged(shape)
            else:
                self.weights[name] = nn.Parameter(torch.full(shape, torch.nan))

    @staticmethod
    def merged(shape):
        param = nn.Parameter(torch.full(shape, torch.nan))
        half = shape[0] // 2

        def load_half(param, tensor, shard):
            param.data[shard * half : (shard + 1) * half] = tensor

        param.weight_loader = load_half
        return param

    def named_parameters(self, *args, **kwargs):
        return iter(self.weights.items())


def test_load_weights_loads_every_tensor_of_a_complete_checkpoint(tmp_path):
    folder = tiny_13b(tmp_path)
    model = PluginParameters(folder)
    state = load_file(folder / "model.safetensors")
    assert model.load_weights(iter(state.items())) == set(model.weights)
    for name, param in model.weights.items():
        assert not param.isnan().any(), name


def test_load_weights_names_each_missing_and_unexpected_tensor(broken):
    state = load_file(broken / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        PluginParameters(broken).load_weights(iter(state.items()))
    assert str(error.value) == folder_error(broken)


def test_gate_up_counts_as_loaded_only_once_both_halves_are(tmp_path):
    folder = tiny_13b(tmp_path)
    state = load_file(folder / "model.safetensors")
    model = PluginParameters(folder)
    # Quantized: the names are not checked against the unquantized layout, so vLLM
    # learns what is missing from the names returned.
    model.quant_config = object()
    loaded = model.load_weights((name, tensor) for name, tensor in state.items() if name != UP)
    assert set(model.weights) - loaded == {"model.layers.1.mlp.gate_up_proj.weight"}


def test_load_weights_of_a_quantized_checkpoint_names_an_unexpected_tensor(tmp_path):
    folder = tiny_13b(tmp_path)
    state = {**load_file(folder / "model.safetensors"), EXTRA: torch.zeros(4, 128)}
    model = PluginParameters(folder)
    model.quant_config = object()
    with pytest.raises(CheckpointError, match=f"1 unexpected tensor.*{EXTRA}"):
        model.load_weights(iter(state.items()))
