"""The official Chat-4bits layout (bitsandbytes 0.41 quant_state lists) loads on bnb today."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import quantize_4bit
from safetensors.torch import load_file, save_file

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.loading import CheckpointError, load_model_and_tokenizer, registry
from langchain_baichuan2.testing import make_tiny_checkpoint, make_tiny_legacy_4bit_checkpoint

PROMPT = torch.tensor([[195, 40, 41, 42, 43, 44, 196]])
# The SPEC's list of quantized layers, written out here so the tests do not borrow it
# from the module under test.
LINEARS = ("self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SIZES = {
    "7b": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256},
    "13b": {"hidden_size": 320, "num_attention_heads": 5, "intermediate_size": 128},
}


def logits_of(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids.to(model.device)).logits


def quantized_names(folder: Path) -> list[str]:
    config = json.loads((folder / "config.json").read_text())
    return [
        f"model.layers.{n}.{linear}.weight"
        for n in range(config["num_hidden_layers"])
        for linear in LINEARS
    ]


def write_modern_4bit(src: Path, dst: Path, quantization_config: dict) -> Path:
    """The same bf16 weights quantized by bitsandbytes and saved as bitsandbytes saves today.

    Every quantized weight becomes the packed bytes plus ``QuantState.as_dict(packed=True)``
    in ``model.safetensors``, which transformers' own pre-quantized loader reads.
    """
    folder = Path(shutil.copytree(src, dst))
    state = load_file(folder / "model.safetensors")
    for name in quantized_names(folder):
        packed, quant_state = quantize_4bit(
            state[name], blocksize=64, quant_type="nf4", compress_statistics=True
        )
        state[name] = packed
        state.update({f"{name}.{k}": v for k, v in quant_state.as_dict(packed=True).items()})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["7b", "13b"])
def pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """A legacy Chat-4bits folder and the same quantized weights in today's layout."""
    root = tmp_path_factory.mktemp(f"legacy-{request.param}")
    kwargs = {**SIZES[request.param], "seed": 5}
    legacy = make_tiny_legacy_4bit_checkpoint(root / "legacy", request.param, **kwargs)
    full = make_tiny_checkpoint(
        root / "bf16",
        request.param,
        dtype=torch.bfloat16,
        tokenizer_model=legacy / "tokenizer.model",
        **kwargs,
    )
    quantization_config = json.loads((legacy / "config.json").read_text())["quantization_config"]
    return legacy, write_modern_4bit(full, root / "modern", quantization_config)


@pytest.fixture(scope="module")
def legacy_13b(tmp_path_factory) -> Path:
    return make_tiny_legacy_4bit_checkpoint(tmp_path_factory.mktemp("legacy13b"), "13b")


def stored(folder: Path) -> dict:
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a legacy folder and apply ``edit`` to its unpickled state dict."""
    folder = Path(shutil.copytree(src, dst))
    state = stored(folder)
    edit(state)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


# -- the fixture is the official layout ---------------------------------------------------


def test_fixture_holds_the_bitsandbytes_041_lists(legacy_13b, shared_dir):
    state = stored(legacy_13b)
    config = json.loads((legacy_13b / "config.json").read_text())
    official = json.loads((shared_dir / "13b" / "config.4bits.json").read_text())
    assert config["quantization_config"] == official["quantization_config"]
    for name in quantized_names(legacy_13b):
        assert name not in state
        assert state[name + ".data"].dtype == torch.uint8
        absmax, shape, dtype, blocksize, nested, quant_type, code = state[name + ".quant_state"]
        offset, (nested_absmax, nested_code) = nested
        assert (absmax.dtype, dtype, blocksize, quant_type) == (
            torch.uint8,
            torch.bfloat16,
            64,
            "nf4",
        )
        assert isinstance(shape, torch.Size)
        assert state[name + ".data"].numel() * 2 == shape.numel()
        assert all(isinstance(t, torch.Tensor) for t in (offset, nested_absmax, nested_code, code))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert state[name].dtype == torch.bfloat16


# -- loading ------------------------------------------------------------------------------


def test_packed_bytes_and_statistics_are_used_as_stored(legacy_13b):
    model = load_model_and_tokenizer(legacy_13b).model
    state = stored(legacy_13b)
    assert model.is_loaded_in_4bit
    for name in quantized_names(legacy_13b):
        weight = model.get_parameter(name)
        assert type(weight).__name__ == "Params4bit"
        assert torch.equal(weight.data, state[name + ".data"])  # not re-quantized
        absmax, _, _, _, (offset, (nested_absmax, nested_code)), _, code = state[
            name + ".quant_state"
        ]
        quant_state = weight.quant_state
        assert torch.equal(quant_state.absmax, absmax)  # nested absmax kept as uint8
        assert torch.equal(quant_state.offset, offset)
        assert torch.equal(quant_state.state2.absmax, nested_absmax)
        assert torch.equal(quant_state.state2.code, nested_code)
        assert torch.equal(quant_state.code, code)
        assert quant_state.state2.blocksize == 256
    # bitsandbytes repacks CPU weights on first use; the state dict still holds the bytes.
    logits_of(model)
    saved = model.state_dict()
    for name in quantized_names(legacy_13b):
        assert torch.equal(saved[name], state[name + ".data"])


def test_head_is_normalized_in_fp32_and_the_rest_stays_full_precision(legacy_13b):
    model = load_model_and_tokenizer(legacy_13b).model
    head = stored(legacy_13b)["lm_head.weight"]
    expected = torch.nn.functional.normalize(head.float(), dim=-1).to(model.lm_head.weight.dtype)
    assert torch.equal(model.lm_head.weight, expected)
    assert type(model.lm_head).__name__ == "Linear"
    assert type(model.model.embed_tokens).__name__ == "Embedding"


def test_legacy_and_todays_layout_give_bit_identical_logits(pair):
    legacy, modern = pair
    packed = load_file(modern / "model.safetensors")
    state = stored(legacy)
    for name in quantized_names(legacy):  # the premise: the very same quantized weights
        assert torch.equal(packed[name], state[name + ".data"])
        assert torch.equal(packed[name + ".absmax"], state[name + ".quant_state"][0])
    a = load_model_and_tokenizer(legacy).model
    b = load_model_and_tokenizer(modern).model
    assert a.dtype == b.dtype
    assert torch.equal(logits_of(a), logits_of(b))
    batch = torch.tensor([[0, 0, 195, 50, 51, 196], [195, 60, 61, 62, 63, 196]])
    mask = (batch != 0).long()
    with torch.no_grad():
        got = a(batch, attention_mask=mask).logits
        want = b(batch, attention_mask=mask).logits
    assert torch.equal(got, want)


def test_greedy_chat_answers_match_todays_layout(pair):
    legacy, modern = pair
    messages = [("system", "Be brief."), ("human", "你好，请介绍一下你自己。")]
    answers = [
        ChatBaichuan2(model=str(folder), temperature=0, max_tokens=12).invoke(messages)
        for folder in (legacy, modern)
    ]
    assert answers[0].content  # a real answer, not an immediate stop
    assert answers[0].content == answers[1].content
    assert answers[0].usage_metadata["output_tokens"] == answers[1].usage_metadata["output_tokens"]


def test_generate_and_save_pretrained_work_on_the_converted_model(legacy_13b, tmp_path):
    loaded = load_model_and_tokenizer(legacy_13b)
    model = loaded.model
    out = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, PROMPT.shape[1] + 6)
    model.save_pretrained(tmp_path / "saved")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(legacy_13b / name, tmp_path / "saved" / name)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    state = stored(legacy_13b)
    for name in quantized_names(legacy_13b):
        assert torch.equal(saved[name], state[name + ".data"])
    reloaded = load_model_and_tokenizer(tmp_path / "saved").model
    # Only the already-normal head is normalized again, which moves it by rounding.
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=0.02)
    assert torch.equal(
        reloaded.generate(PROMPT, max_new_tokens=6, do_sample=False)[:, :8], out[:, :8]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loads_on_cuda_bit_identical_to_todays_layout(pair):
    legacy, modern = pair
    a = load_model_and_tokenizer(legacy, device_map="cuda").model
    b = load_model_and_tokenizer(modern, device_map="cuda").model
    assert a.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert a.model.layers[0].mlp.up_proj.weight.quant_state.absmax.device.type == "cuda"
    assert torch.equal(logits_of(a), logits_of(b))


# -- footprint ------------------------------------------------------------------------------


def test_footprint_is_logged_once_and_counts_packed_weights(legacy_13b, caplog):
    with caplog.at_level(logging.INFO, logger="langchain_baichuan2.loading.load"):
        loaded = load_model_and_tokenizer(legacy_13b)
    lines = [r.getMessage() for r in caplog.records if r.name == "langchain_baichuan2.loading.load"]
    assert len(lines) == 1 and "uint8" in lines[0]
    state = stored(legacy_13b)
    packed = sum(state[name + ".data"].numel() for name in quantized_names(legacy_13b))
    absmax = sum(state[name + ".quant_state"][0].numel() for name in quantized_names(legacy_13b))
    assert loaded.memory_footprint["uint8"] == packed + absmax
    assert "float32" in loaded.memory_footprint  # nested scales, offsets and code tables


def test_identifying_params_stay_the_same_once_loaded(legacy_13b, tmp_path):
    folder = Path(shutil.copytree(legacy_13b, tmp_path / "ckpt"))
    llm = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=2)
    before = dict(llm._identifying_params)
    assert registry.peek(folder) is None  # asking did not load it
    llm.invoke("hi")
    assert llm._identifying_params == before  # LangChain's cache key does not change
    assert registry.get(folder).memory_footprint["uint8"] > 0


def test_norms_stored_in_fp32_beside_bf16_weights_load_and_run(legacy_13b, tmp_path):
    folder = Path(shutil.copytree(legacy_13b, tmp_path / "ckpt"))
    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if "layernorm" in name or name == "model.norm.weight":
                state[name] = value.float()
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                state[name] = value.bfloat16()
    torch.save(state, path)
    for dtype in ("float32", "bfloat16"):
        llm = ChatBaichuan2(model=str(folder), dtype=dtype, temperature=0, max_tokens=3)
        assert llm.invoke("hi").usage_metadata["output_tokens"] >= 1


# -- errors ---------------------------------------------------------------------------------

QKV = "model.layers.1.self_attn.W_pack.weight"


def test_missing_quant_state_names_the_tensor(legacy_13b, tmp_path):
    folder = rewrite(legacy_13b, tmp_path / "ckpt", lambda s: s.pop(QKV + ".quant_state"))
    with pytest.raises(CheckpointError, match=rf"'{QKV}\.quant_state'.*missing"):
        load_model_and_tokenizer(folder)


def test_fp4_quant_type_names_the_tensor(legacy_13b, tmp_path):
    def to_fp4(state):
        state[QKV + ".quant_state"][5] = "fp4"

    folder = rewrite(legacy_13b, tmp_path / "ckpt", to_fp4)
    with pytest.raises(CheckpointError, match=rf"'{QKV}\.quant_state'.*'fp4'"):
        load_model_and_tokenizer(folder)


def test_shape_that_does_not_match_the_config_names_the_tensor(legacy_13b, tmp_path):
    folder = Path(shutil.copytree(legacy_13b, tmp_path / "ckpt"))
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 64
    (folder / "config.json").write_text(json.dumps(config))
    gate = "model.layers.0.mlp.gate_proj.weight.quant_state"
    with pytest.raises(CheckpointError, match=rf"'{gate}'.*shape.*do not match the config"):
        load_model_and_tokenizer(folder)


def test_packed_data_of_the_wrong_size_names_the_tensor(legacy_13b, tmp_path):
    def truncate(state):
        state[QKV + ".data"] = state[QKV + ".data"][:-8].clone()

    folder = rewrite(legacy_13b, tmp_path / "ckpt", truncate)
    with pytest.raises(CheckpointError, match=rf"'{QKV}\.data'.*uint8 bytes"):
        load_model_and_tokenizer(folder)


class Trap:
    """Unpickling this would create ``marker``: proof of code run by the loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_file_is_unpickled_with_weights_only(legacy_13b, tmp_path):
    marker = tmp_path / "executed"

    def plant(state):
        state[QKV + ".quant_state"][6] = Trap(marker)

    folder = rewrite(legacy_13b, tmp_path / "ckpt", plant)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin safely.*not an allowed global"):
        load_model_and_tokenizer(folder)
    assert not marker.exists()
    # The file really holds the planted object (so the refusal is what kept it inert);
    # read the pickle opcodes rather than unpickling it.
    import pickletools
    import zipfile

    with zipfile.ZipFile(folder / "pytorch_model.bin") as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        opcodes = [arg for _, arg, _ in pickletools.genops(archive.read(name)) if arg]
    # getattr(pathlib.Path, "touch") is what unpickling would have called.
    assert {"__builtin__ getattr", "pathlib Path", "touch"} <= set(map(str, opcodes))


def test_auto_classes_name_the_loader_for_an_official_4bit_folder(legacy_13b):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="Chat-4bits checkpoint.*load_model_and_tokenizer"):
        AutoModelForCausalLM.from_pretrained(legacy_13b)
