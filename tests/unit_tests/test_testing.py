"""make_tiny_checkpoint writes the official Baichuan2 folder layout."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from langchain_baichuan2.testing import make_tiny_checkpoint, user_defined_pieces


@pytest.fixture
def official(shared_dir: Path):
    """Path of an official file in the shared folder (skips where absent)."""

    def find(*parts: str) -> Path:
        path = shared_dir.joinpath(*parts)
        if not path.is_file():
            pytest.skip(f"official file not found at {path}")
        return path

    return find


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, whatever its format and sharding."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    for file in sorted(folder.glob("*.bin")):
        state.update(torch.load(file, weights_only=True))
    return state


@pytest.fixture(scope="module")
def tiny_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny7b"), "7b", model_max_length=512)


@pytest.fixture(scope="module")
def tiny_13b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny13b"),
        "13b",
        hidden_size=80,
        num_attention_heads=5,
        num_hidden_layers=3,
        weights="bin",
        num_shards=3,
    )


@pytest.fixture(scope="module")
def sp(tiny_7b: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_7b / "tokenizer.model"))


@pytest.mark.parametrize("variant", ["7b", "13b"])
def test_config_has_the_official_keys_in_the_official_order(official, tmp_path, variant):
    expected = list(read_json(official(variant, "config.json")))
    folder = make_tiny_checkpoint(tmp_path, variant)
    assert list(read_json(folder / "config.json")) == expected


def test_config_values(tiny_7b, tiny_13b, sp):
    seven, thirteen = read_json(tiny_7b / "config.json"), read_json(tiny_13b / "config.json")
    for config in (seven, thirteen):
        assert config["architectures"] == ["BaichuanForCausalLM"]
        assert config["model_type"] == "baichuan"
        assert config["tokenizer_class"] == "BaichuanTokenizer"
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
        assert (config["hidden_act"], config["rms_norm_eps"]) == ("silu", 1e-6)
        assert config["tie_word_embeddings"] is False
        assert config["use_cache"] is True
        assert config["torch_dtype"] == "float32"
        assert config["vocab_size"] == sp.get_piece_size()
    assert seven["max_position_embeddings"] == seven["model_max_length"] == 512
    assert (seven["hidden_size"], seven["num_attention_heads"]) == (64, 4)
    assert not {"max_position_embeddings", "rope_theta", "rope_scaling"} & set(thirteen)
    assert (thirteen["hidden_size"], thirteen["num_attention_heads"]) == (80, 5)
    assert thirteen["num_hidden_layers"] == 3


def test_generation_config_is_the_official_one(tiny_7b):
    ours = read_json(tiny_7b / "generation_config.json")
    assert ours == {
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "user_token_id": 195,
        "assistant_token_id": 196,
        "max_new_tokens": 2048,
        "temperature": 0.3,
        "top_k": 5,
        "top_p": 0.85,
        "repetition_penalty": 1.05,
        "do_sample": True,
        "transformers_version": "4.29.2",
    }


@pytest.mark.parametrize("variant", ["7b", "13b"])
def test_generation_config_matches_the_official_file(official, tiny_7b, variant):
    expected = read_json(official(variant, "generation_config.json"))
    assert read_json(tiny_7b / "generation_config.json") == expected


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_tokenizer_files_are_the_official_13b_ones(official, tmp_path, name):
    expected = read_json(official("13b", name))
    ours = read_json(make_tiny_checkpoint(tmp_path, "7b") / name)
    assert ours == expected
    assert list(ours) == list(expected)


def test_tokenizer_config_carries_model_max_length(tiny_7b):
    config = read_json(tiny_7b / "tokenizer_config.json")
    assert config["model_max_length"] == 512
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)


def test_sharded_index_names_are_the_official_13b_names(official, tiny_13b):
    official_map = read_json(official("13b", "pytorch_model.bin.index.json"))["weight_map"]

    def layer(name: str) -> int:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return int(match.group(1)) if match else -1

    expected = sorted(name for name in official_map if layer(name) < 3)
    index = read_json(tiny_13b / "pytorch_model.bin.index.json")
    assert list(index["weight_map"]) == expected
    shards = [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
    assert index["weight_map"]["lm_head.weight"] == shards[-1]
    state = load_all(tiny_13b)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    for name, file in index["weight_map"].items():
        assert name in torch.load(tiny_13b / file, weights_only=True)


def test_each_layer_stays_in_one_shard(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "13b", num_hidden_layers=4, num_shards=2)
    weight_map = read_json(folder / "model.safetensors.index.json")["weight_map"]
    assert sorted(set(weight_map.values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    for n in range(4):
        files = {f for name, f in weight_map.items() if name.startswith(f"model.layers.{n}.")}
        assert len(files) == 1


def test_shapes(tiny_13b):
    state = load_all(tiny_13b)
    vocab, hidden, inter = read_json(tiny_13b / "config.json")["vocab_size"], 80, 128
    assert state["model.embed_tokens.weight"].shape == (vocab, hidden)
    assert state["lm_head.weight"].shape == (vocab, hidden)
    assert state["model.norm.weight"].shape == (hidden,)
    for n in range(3):
        p = f"model.layers.{n}."
        assert state[p + "self_attn.W_pack.weight"].shape == (3 * hidden, hidden)
        assert state[p + "self_attn.o_proj.weight"].shape == (hidden, hidden)
        assert state[p + "mlp.gate_proj.weight"].shape == (inter, hidden)
        assert state[p + "mlp.up_proj.weight"].shape == (inter, hidden)
        assert state[p + "mlp.down_proj.weight"].shape == (hidden, inter)
        assert state[p + "input_layernorm.weight"].shape == (hidden,)
        assert state[p + "post_attention_layernorm.weight"].shape == (hidden,)
    assert len(state) == 3 + 7 * 3
    assert all(t.dtype == torch.float32 for t in state.values())


def test_lm_head_rows_are_not_normalized(tiny_7b):
    norms = load_file(tiny_7b / "model.safetensors")["lm_head.weight"].norm(dim=-1)
    assert (norms - 1).abs().min() > 0.5


def test_tokenizer_piece_layout(sp):
    assert sp.get_piece_size() == 1800
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (3, 4, 5, 6)] == ["<SEP>", "<CLS>", "\n", "\t"]
    assert sp.id_to_piece(195) == "<reserved_106>"
    assert sp.id_to_piece(196) == "<reserved_107>"
    assert [sp.id_to_piece(i) for i in range(3, 1089)] == user_defined_pieces()
    assert [sp.id_to_piece(i) for i in (1089, 1344)] == ["<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(1089, 1345))
    assert not sp.is_byte(1345)


def test_user_defined_pieces_match_the_real_tokenizer(official):
    real = spm.SentencePieceProcessor(model_file=str(official("tokenizer.model")))
    assert [real.id_to_piece(i) for i in range(3, 1345)] == user_defined_pieces() + [
        f"<0x{b:02X}>" for b in range(256)
    ]


def test_tokenizer_behaves_like_the_official_one(sp):
    assert sp.encode("a\nb\tc<reserved_106>x<reserved_107>", out_type=str) == [
        "a", "\n", "b", "\t", "c", "<reserved_106>", "x", "<reserved_107>",
    ]  # fmt: skip
    assert sp.encode("龘", out_type=str) == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert sp.decode(sp.encode("龘 ok")) == "龘 ok"
    assert not sp.encode("hello", out_type=str)[0].startswith("▁")  # no dummy prefix
    assert sp.encode("2023", out_type=str) == ["2", "0", "2", "3"]  # split digits
    assert sp.decode(sp.encode("  two  spaces\n")) == "  two  spaces\n"  # whitespace kept
    assert sp.encode("Ａ", out_type=str) != sp.encode("A", out_type=str)  # identity normalizer
    assert len(sp.encode("你好，世界！")) <= 6  # Chinese is in the vocabulary


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "13b", num_shards=2, seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", "13b", num_shards=2, seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", "13b", num_shards=2, seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "tokenizer.model").read_bytes() == (c / "tokenizer.model").read_bytes()
    assert not torch.equal(load_all(a)["lm_head.weight"], load_all(c)["lm_head.weight"])


def test_formats_and_sharding_hold_the_same_tensors(tmp_path):
    single = load_all(make_tiny_checkpoint(tmp_path / "st", "7b", seed=5))
    sharded = load_all(
        make_tiny_checkpoint(tmp_path / "pt", "7b", weights="bin", num_shards=4, seed=5)
    )
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert (tmp_path / "pt" / "pytorch_model-00004-of-00004.bin").is_file()
    assert not list((tmp_path / "pt").glob("*.safetensors"))


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_half_dtype_is_stored_and_declared(tmp_path, weights):
    folder = make_tiny_checkpoint(tmp_path, "13b", weights=weights, dtype=torch.bfloat16)
    assert read_json(folder / "config.json")["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_all(folder).values())


def test_no_python_files_in_the_folder(tiny_7b, tiny_13b):
    assert not list(tiny_7b.glob("*.py")) + list(tiny_13b.glob("*.py"))


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_shards": 2}, {"weights": "bin"}, {"weights": "bin", "num_shards": 2}]
)
def test_every_file_gets_the_same_mode_as_any_new_file(tmp_path, kwargs):
    # safetensors' save_file wrote the weights 0600 while the other files were 0644.
    umask = os.umask(0o022)
    os.umask(umask)
    folder = make_tiny_checkpoint(tmp_path / "tiny", hidden_size=16, **kwargs)
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_given_tokenizer_model_is_copied(official, tmp_path):
    real = official("tokenizer.model")
    folder = make_tiny_checkpoint(tmp_path, "13b", hidden_size=16, tokenizer_model=real)
    assert (folder / "tokenizer.model").read_bytes() == real.read_bytes()
    assert read_json(folder / "config.json")["vocab_size"] == 125696
    assert load_file(folder / "model.safetensors")["lm_head.weight"].shape == (125696, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "70b"}, "variant"),
        ({"weights": "gguf"}, "weights"),
        ({"num_shards": 0}, "num_shards"),
        ({"num_shards": 5}, "num_shards"),
        ({"hidden_size": 80, "num_attention_heads": 3}, "divisible"),
        ({"variant": "7b", "hidden_size": 60, "num_attention_heads": 4}, "even"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_checkpoint(tmp_path, **kwargs)
