"""``loading.checkpoint``: every check of a folder, before any weight loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.loading.checkpoint import CheckpointError, check_checkpoint
from langchain_baichuan2.modeling import BaichuanForCausalLM, BaichuanTokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint

UP = "model.layers.1.mlp.up_proj.weight"
ADDED = ["<tool_call>", "</tool_call>"]


@pytest.fixture(scope="module")
def safetensors_folder(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("st"), "13b")


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bin"), "7b", weights="bin", num_shards=2)


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_safetensors(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_bin_shards(folder: Path, change) -> None:
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state = torch.load(shard, weights_only=True)
        change(state)
        torch.save(state, shard)


# -- every tensor present, none unexpected -------------------------------------------------


def test_a_complete_checkpoint_passes(safetensors_folder, bin_folder):
    assert check_checkpoint(safetensors_folder).num_hidden_layers == 2
    assert check_checkpoint(bin_folder).position_embedding == "rope"


def test_a_missing_mlp_tensor_is_named_before_any_weight_loads(safetensors_folder, tmp_path):
    folder = copy(safetensors_folder, tmp_path / "ckpt")
    edit_safetensors(folder, lambda tensors: tensors.pop(UP))
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {UP}"):
        check_checkpoint(folder)


def test_a_tensor_missing_from_a_bin_shard_is_named(bin_folder, tmp_path):
    folder = copy(bin_folder, tmp_path / "ckpt")
    edit_bin_shards(folder, lambda state: state.pop(UP, None))
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {UP}"):
        check_checkpoint(folder)


def test_an_extra_tensor_is_named(safetensors_folder, tmp_path):
    folder = copy(safetensors_folder, tmp_path / "ckpt")
    edit_safetensors(folder, lambda tensors: tensors.update(stray=torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): stray"):
        check_checkpoint(folder)


def test_an_extra_layer_is_named(safetensors_folder, tmp_path):
    folder = copy(safetensors_folder, tmp_path / "ckpt")
    name = "model.layers.2.mlp.up_proj.weight"
    edit_safetensors(folder, lambda tensors: tensors.update({name: tensors[UP].clone()}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor\(s\): {name}"):
        check_checkpoint(folder)


def test_saved_rope_frequencies_are_accepted_as_transformers_accepts_them(bin_folder, tmp_path):
    # Baichuan-1 7B saved each layer's ``rotary_emb.inv_freq``; the model recomputes it.
    folder = copy(bin_folder, tmp_path / "ckpt")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, shard)
    check_checkpoint(folder)
    load_model_and_tokenizer(folder)


def test_a_missing_tensor_is_refused_even_when_quantized(safetensors_folder, tmp_path):
    folder = copy(safetensors_folder, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    edit_safetensors(folder, lambda tensors: tensors.pop(UP))
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {UP}"):
        check_checkpoint(folder)


# -- the vocabulary is the tokenizer's full length ------------------------------------------


def add_tokens_the_hugging_face_way(src: Path, dst: Path) -> Path:
    """Add tokens, resize embeddings and head, and save, as a fine-tuning script does."""
    tokenizer = BaichuanTokenizer.from_pretrained(src)
    tokenizer.add_tokens(ADDED)
    model = BaichuanForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def test_a_fine_tune_with_added_tokens_passes_and_loads(safetensors_folder, tmp_path):
    folder = add_tokens_the_hugging_face_way(safetensors_folder, tmp_path / "ft")
    pieces = BaichuanTokenizer.from_pretrained(safetensors_folder).vocab_size
    assert (folder / "added_tokens.json").is_file()
    assert check_checkpoint(folder).vocab_size == pieces + len(ADDED)
    loaded = load_model_and_tokenizer(folder)
    ids = loaded.tokenizer.encode("a" + ADDED[0], add_special_tokens=False)
    assert ids[-1] == pieces
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits
    assert logits.shape[-1] == pieces + len(ADDED)


def test_added_tokens_without_resized_weights_are_refused(safetensors_folder, tmp_path):
    folder = copy(safetensors_folder, tmp_path / "ckpt")
    tokenizer = BaichuanTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(ADDED)
    tokenizer.save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"plus 2 added tokens but config.json says"):
        check_checkpoint(folder)
