"""Loading official-layout checkpoints: Auto classes, formats, quantization, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from pytest_socket import disable_socket, enable_socket
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import langchain_baichuan2  # noqa: F401  (registers the Auto classes)
from langchain_baichuan2.loading import (
    CheckpointError,
    DownloadError,
    load_model_and_tokenizer,
    registry,
)
from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM
from langchain_baichuan2.testing import make_tiny_checkpoint

PROMPT = torch.tensor([[195, 40, 41, 42, 43, 44, 196]])


def logits_of(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float()


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_auto_classes_load_without_remote_code_and_never_run_folder_python(
    tiny_checkpoint, tmp_path
):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    marker = tmp_path / "executed"
    trap = f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('folder code ran')\n"
    for name in ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py"):
        (folder / name).write_text(trap)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(config, BaichuanConfig)
    assert isinstance(model, BaichuanForCausalLM)
    assert type(tokenizer).__name__ == "BaichuanTokenizer"
    assert not marker.exists()
    norms = model.lm_head.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)


def test_baichuan_1_tokenizer_class_name_gives_the_native_tokenizer(tiny_7b, tmp_path):
    folder = copy_checkpoint(tiny_7b, tmp_path / "ckpt")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "BaiChuanTokenizer"  # as Baichuan-7B's folder spells it
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "BaichuanTokenizer"
    assert tokenizer.encode("<reserved_106>hi", add_special_tokens=False)[0] == 195


def test_baichuan_1_keeps_its_head_as_stored(tmp_path):
    from safetensors.torch import load_file

    folder = make_tiny_checkpoint(tmp_path / "baichuan1", "7b", vocab_size=64000)
    assert not BaichuanConfig.from_pretrained(folder).norm_head
    stored = load_file(folder / "model.safetensors")["lm_head.weight"]
    assert torch.equal(load_model_and_tokenizer(folder).model.lm_head.weight, stored)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).lm_head.weight, stored)


def test_position_scheme_follows_the_official_config_keys(tiny_7b, tiny_13b):
    assert AutoConfig.from_pretrained(tiny_7b).position_embedding == "rope"
    assert AutoConfig.from_pretrained(tiny_13b).position_embedding == "alibi"


def test_official_config_files_load_unchanged(shared_dir):
    seven = BaichuanConfig.from_pretrained(shared_dir / "7b")
    thirteen = BaichuanConfig.from_pretrained(shared_dir / "13b")
    assert (seven.position_embedding, seven.hidden_size, seven.num_hidden_layers) == (
        "rope",
        4096,
        32,
    )
    assert (thirteen.position_embedding, thirteen.hidden_size, thirteen.num_attention_heads) == (
        "alibi",
        5120,
        40,
    )


def test_state_dict_names_are_the_official_13b_names(shared_dir):
    index = json.loads((shared_dir / "13b" / "pytorch_model.bin.index.json").read_text())
    official = set(index["weight_map"])
    config = BaichuanConfig.from_pretrained(shared_dir / "13b")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 40, 40, 8
    config.num_attention_heads, config.vocab_size = 4, 16
    ours = set(BaichuanForCausalLM(config).state_dict())
    assert ours == official


def test_head_rows_are_normalized_at_load_not_in_the_file(tiny_13b):
    from safetensors.torch import load_file

    stored = load_file(tiny_13b / "model.safetensors")["lm_head.weight"]
    assert not torch.allclose(stored.norm(dim=-1), torch.ones(stored.shape[0]))
    loaded = load_model_and_tokenizer(tiny_13b)
    expected = torch.nn.functional.normalize(stored.float(), dim=-1)
    torch.testing.assert_close(loaded.model.lm_head.weight, expected)


def test_safetensors_and_sharded_bin_give_identical_models(tmp_path):
    kwargs = {"seed": 11, "tokenizer_model": None}
    st = make_tiny_checkpoint(tmp_path / "st", "13b", weights="safetensors", num_shards=2, **kwargs)
    pt = make_tiny_checkpoint(tmp_path / "pt", "13b", weights="bin", num_shards=3, **kwargs)
    assert (pt / "pytorch_model.bin.index.json").is_file()
    assert (st / "model.safetensors.index.json").is_file()
    a = load_model_and_tokenizer(st).model
    b = load_model_and_tokenizer(pt).model
    torch.testing.assert_close(logits_of(a), logits_of(b), rtol=0, atol=0)


def test_save_pretrained_round_trip_gives_the_same_logits(tiny_7b, tmp_path):
    model = load_model_and_tokenizer(tiny_7b).model
    model.save_pretrained(tmp_path / "saved")
    reloaded = BaichuanForCausalLM.from_pretrained(tmp_path / "saved")
    # Normalizing the already-normal head again moves it by float rounding only.
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=1e-6)


def test_loaded_model_equals_a_model_built_from_the_files_tensors(tiny_checkpoint):
    from safetensors.torch import load_file

    files = sorted(tiny_checkpoint.glob("*.safetensors")) or sorted(tiny_checkpoint.glob("*.bin"))
    state = {}
    for f in files:
        state.update(
            load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        )
    built = BaichuanForCausalLM(BaichuanConfig.from_pretrained(tiny_checkpoint)).eval()
    built.load_state_dict(state)
    built.normalize_head()
    loaded = load_model_and_tokenizer(tiny_checkpoint).model
    torch.testing.assert_close(logits_of(loaded), logits_of(built), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_load(tiny_7b, dtype):
    model = load_model_and_tokenizer(tiny_7b, dtype=dtype).model
    assert model.dtype == getattr(torch, dtype)
    reference = logits_of(load_model_and_tokenizer(tiny_7b, dtype="float32").model)
    torch.testing.assert_close(logits_of(model), reference, rtol=0, atol=0.05)


def test_device_map_auto_loads_on_cpu(tiny_13b):
    model = load_model_and_tokenizer(tiny_13b, device_map="auto").model
    assert model.device.type == "cpu"
    assert torch.isfinite(logits_of(model)).all()


def dequantized(linear) -> torch.Tensor:
    """The weight a (bias-free) layer computes with, read off by feeding it the identity.

    This holds whatever layout bitsandbytes keeps its packed data in on this device.
    """
    with torch.no_grad():
        return linear(torch.eye(linear.in_features)).float().T


# Stated tolerances: NF4 keeps each weight within ~12% (relative L2, blocksize 64),
# int8 within ~1%; on a 2-layer random model the logits then keep a cosine
# similarity >= 0.9 with the fp32 ones (random tiny models amplify the noise).
@pytest.mark.parametrize(("quantization", "weight_tolerance"), [("8bit", 0.01), ("4bit", 0.12)])
def test_bitsandbytes_quantized_load_stays_close_to_fp32(
    tiny_checkpoint, quantization, weight_tolerance
):
    full = load_model_and_tokenizer(tiny_checkpoint).model
    model = load_model_and_tokenizer(tiny_checkpoint, quantization=quantization).model
    for name in (
        "self_attn.W_pack",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ):
        quantized = model.model.layers[1].get_submodule(name)
        assert type(quantized).__name__ in ("Linear4bit", "Linear8bitLt")
        original = full.model.layers[1].get_submodule(name).weight
        error = (dequantized(quantized) - original).norm() / original.norm()
        assert error <= weight_tolerance, (name, error)
    assert type(model.lm_head).__name__ == "Linear"  # the head stays full precision
    reference, got = logits_of(full), logits_of(model)
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) >= 0.9


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_model_saves_and_reloads(tiny_13b, tmp_path, quantization):
    model = load_model_and_tokenizer(tiny_13b, quantization=quantization).model
    expected = logits_of(model)
    model.save_pretrained(tmp_path / "q")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_13b / name, tmp_path / "q" / name)
    reloaded = load_model_and_tokenizer(tmp_path / "q").model
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    # bitsandbytes' CPU kernel keeps 4-bit scales in bf16, so logits agree to ~1%.
    spread = expected.abs().max().item()
    torch.testing.assert_close(logits_of(reloaded), expected, rtol=0, atol=0.01 * spread)


def test_registry_shares_one_model_per_configuration(tiny_7b):
    a = registry.get(tiny_7b)
    b = registry.get(str(tiny_7b) + "/")
    c = registry.get(tiny_7b, dtype="bfloat16")
    assert a is b
    assert a.model is not c.model


# -- errors ---------------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model", "model.safetensors"])
def test_missing_file_is_named(tiny_13b, tmp_path, name):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match="missing|No weights"):
        load_model_and_tokenizer(folder)


def test_missing_shard_is_named(tiny_7b, tmp_path):
    folder = copy_checkpoint(tiny_7b, tmp_path / "ckpt")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        load_model_and_tokenizer(folder)


def test_config_of_another_model_type_is_rejected(tiny_13b, tmp_path):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'llama', not 'baichuan'"):
        load_model_and_tokenizer(folder)


@pytest.mark.parametrize("fixture", ["tiny_7b", "tiny_13b"])
def test_shape_mismatch_names_the_tensor(request, tmp_path, fixture):
    folder = copy_checkpoint(request.getfixturevalue(fixture), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gate_proj|up_proj|down_proj|shape|size"):
        load_model_and_tokenizer(folder)


@pytest.mark.parametrize("fixture", ["tiny_7b", "tiny_13b"])
def test_truncated_weights_file_is_named(request, tmp_path, fixture):
    folder = copy_checkpoint(request.getfixturevalue(fixture), tmp_path / "ckpt")
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    data = weights[-1].read_bytes()
    weights[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=weights[-1].name):
        load_model_and_tokenizer(folder)


def rewrite_safetensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.norm.weight", "lm_head.weight"])
def test_a_missing_tensor_is_a_checkpoint_error_naming_it(tiny_13b, tmp_path, name):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    rewrite_safetensors(folder, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=f"missing 1 tensor.*{name}.*|{name}"):
        load_model_and_tokenizer(folder)


def test_an_empty_weights_file_is_a_checkpoint_error(tiny_13b, tmp_path):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    rewrite_safetensors(folder, lambda tensors: tensors.clear())
    with pytest.raises(CheckpointError, match="missing .* tensor"):
        load_model_and_tokenizer(folder)


def test_more_layers_in_the_config_than_in_the_file_is_a_checkpoint_error(tiny_13b, tmp_path):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.W_pack.weight"):
        load_model_and_tokenizer(folder)


def test_an_extra_tensor_is_a_checkpoint_error_naming_it(tiny_13b, tmp_path):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    rewrite_safetensors(folder, lambda tensors: tensors.update(stray=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*stray"):
        load_model_and_tokenizer(folder)


@pytest.mark.parametrize("name", ["baichuan-inc/../../etc", "a/b/c", "../x", "no-slash"])
def test_a_model_id_with_path_tricks_is_rejected_before_any_download(name, monkeypatch):
    from langchain_baichuan2.loading import sources

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(sources, "_download", no_download)
    with pytest.raises(CheckpointError):
        sources.resolve_model_path(name)


def test_unknown_quantization_is_rejected(tiny_13b):
    with pytest.raises(ValueError, match="quantization must be '4bit', '8bit'"):
        load_model_and_tokenizer(tiny_13b, quantization="3bit")


def test_unknown_dtype_and_source_are_rejected(tiny_13b):
    with pytest.raises(ValueError, match="dtype must be"):
        load_model_and_tokenizer(tiny_13b, dtype="float8")
    with pytest.raises(ValueError, match="source must be one of"):
        load_model_and_tokenizer(tiny_13b, source="s3")


@pytest.mark.parametrize("source", ["modelscope", "huggingface", "auto"])
def test_download_without_network_says_so(source, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    disable_socket()
    try:
        with pytest.raises(
            DownloadError, match="Could not download 'baichuan-inc/Baichuan2-7B-Chat'"
        ):
            load_model_and_tokenizer("baichuan-inc/Baichuan2-7B-Chat", source=source)
    finally:
        enable_socket()


@pytest.mark.parametrize("show", [True, False])
def test_progress_bars_are_switchable(tiny_13b, capsys, show):
    load_model_and_tokenizer(tiny_13b, show_progress=show)
    assert ("Loading weights" in capsys.readouterr().err) is show


def test_progress_bars_are_off_when_nobody_watches(tiny_13b, capsys):
    load_model_and_tokenizer(tiny_13b)  # pytest's captured stderr is not a terminal
    assert "Loading weights" not in capsys.readouterr().err


def test_head_is_normalized_in_fp32_before_the_cast_to_half_precision(tmp_path):
    from safetensors.torch import load_file

    folder = make_tiny_checkpoint(tmp_path / "ckpt", "13b", dtype=torch.float32)
    stored = load_file(folder / "model.safetensors")["lm_head.weight"]
    model = load_model_and_tokenizer(folder, dtype="bfloat16").model
    expected = torch.nn.functional.normalize(stored, dim=-1).to(torch.bfloat16)
    assert torch.equal(model.lm_head.weight, expected)


def test_a_tokenizer_that_does_not_fit_the_weights_is_rejected(tiny_13b, tmp_path):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 64
    (folder / "config.json").write_text(json.dumps(config))
    for shard in folder.glob("*.safetensors"):
        shard.unlink()  # rewrite weights with the larger vocabulary
    model = BaichuanForCausalLM(BaichuanConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="tokenizer does not belong"):
        load_model_and_tokenizer(folder)


def test_an_unquantized_load_does_not_import_bitsandbytes(tiny_7b):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from langchain_baichuan2.loading import load_model_and_tokenizer\n"
        f"load_model_and_tokenizer({str(tiny_7b)!r})\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_config_vocab_smaller_than_the_tokenizer_fails_the_folder_check(tiny_13b, tmp_path):
    from langchain_baichuan2.loading import check_checkpoint

    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    pieces = config["vocab_size"]
    config["vocab_size"] = pieces - 64
    (folder / "config.json").write_text(json.dumps(config))
    rewrite_safetensors(
        folder,
        lambda tensors: tensors.update(
            {
                name: tensors[name][: pieces - 64]
                for name in ("model.embed_tokens.weight", "lm_head.weight")
            }
        ),
    )
    with pytest.raises(
        CheckpointError, match=f"has {pieces} pieces but config.json says vocab_size {pieces - 64}"
    ):
        check_checkpoint(folder)


def test_integer_weights_are_refused_in_safetensors(tiny_13b, tmp_path):
    folder = copy_checkpoint(tiny_13b, tmp_path / "ckpt")
    key = "model.layers.0.self_attn.W_pack.weight"
    rewrite_safetensors(folder, lambda tensors: tensors.update({key: tensors[key].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=f"{key}.*stored as I32, not a floating-point"):
        load_model_and_tokenizer(folder)


def test_integer_weights_are_refused_in_bin_shards(tiny_7b, tmp_path):
    folder = copy_checkpoint(tiny_7b, tmp_path / "ckpt")
    key = "model.layers.0.self_attn.W_pack.weight"
    for shard in folder.glob("pytorch_model-*.bin"):
        state = torch.load(shard, weights_only=True)
        if key in state:
            state[key] = state[key].to(torch.int32)
            torch.save(state, shard)
    with pytest.raises(CheckpointError, match=f"{key}.*stored as int32, not a floating-point"):
        load_model_and_tokenizer(folder)
