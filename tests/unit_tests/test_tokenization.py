"""BaichuanTokenizer against the real Baichuan2 tokenizer.model and official configs."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from langchain_baichuan2.modeling.tokenization import BaichuanTokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "baichuan2"
BYTE_IDS = range(1089, 1345)

pytestmark = [
    pytest.mark.real_tokenizer,
    pytest.mark.skipif(
        not (SHARED / "tokenizer.model").is_file(),
        reason=f"real Baichuan2 tokenizer.model not found at {SHARED}",
    ),
]


def _official_folder(dest: Path, variant: str, with_config: bool = False) -> Path:
    """Lays out an official tokenizer folder: its two json files and tokenizer.model."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / variant / name, dest / name)
    if with_config:
        shutil.copy(SHARED / variant / "config.json", dest / "config.json")
    shutil.copy(SHARED / "tokenizer.model", dest / "tokenizer.model")
    return dest


@pytest.fixture(scope="module", params=["7b", "13b"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = _official_folder(tmp_path_factory.mktemp(request.param), request.param)
    return BaichuanTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizer.model"))


ROUND_TRIP_TEXTS = [
    "百川大模型是一个开源的中英双语大语言模型。",
    "The quick brown fox jumps over the lazy dog.",
    "emoji 😀👍🏽 and a flag 🇨🇳",
    'def f(x):\n\treturn {"a": x ** 2}  # 平方\n',
    "  leading, double  and trailing spaces  ",
    "𠮷野家 ꧁ rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_newline_is_user_defined_piece_5(tok):
    assert tok.encode("\n") == [5]
    assert tok.encode("\t") == [6]


def test_reserved_role_tokens_are_single_ids(tok):
    assert tok.encode("<reserved_106>") == [195]
    assert tok.encode("<reserved_107>") == [196]
    assert tok.encode("<reserved_106>你好<reserved_107>")[::2] == [195, 196]


def test_no_dummy_prefix_so_leading_space_is_kept(tok):
    assert not tok.tokenize("hello")[0].startswith("▁")
    assert tok.tokenize(" hello")[0].startswith("▁")
    assert tok.encode("hello") != tok.encode(" hello")


def test_encode_and_call_add_no_bos_or_eos(tok, sp):
    text = "你好,world"
    assert tok.encode(text) == sp.encode(text)
    assert tok(text)["input_ids"] == sp.encode(text)
    assert tok(text)["attention_mask"] == [1] * len(sp.encode(text))


@pytest.mark.parametrize(("literal", "token_id"), [("<unk>", 0), ("<s>", 1), ("</s>", 2)])
def test_literal_special_token_text_maps_to_its_id(tok, sp, literal, token_id):
    assert tok.encode(literal) == [token_id]
    # Glued to words: the official files mark these tokens single_word, which the
    # official tokenizer ignored and so must we.
    assert tok.encode(f"a{literal}b") == sp.encode("a") + [token_id] + sp.encode("b")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_ids_equal_sentencepiece_ids(tok, sp, text):
    assert tok.encode(text) == sp.encode(text)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_of_encode_is_identity(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_rare_character_falls_back_to_its_utf8_bytes(tok):
    ids = tok.encode("𠮷")
    assert all(i in BYTE_IDS for i in ids)
    assert bytes(i - BYTE_IDS.start for i in ids) == "𠮷".encode()
    assert tok.decode(ids) == "𠮷"


def test_decode_writes_special_tokens_as_literal_text(tok):
    ids = [1, *tok.encode("hi"), 2, 0, 195]
    assert tok.decode(ids) == "<s>hi</s><unk><reserved_106>"


def test_skip_special_tokens_drops_only_ids_0_1_2(tok):
    ids = [1, *tok.encode("hi"), 2, 0, 195, 3, 5]
    assert tok.decode(ids, skip_special_tokens=True) == "hi<reserved_106><SEP>\n"


def test_pad_token_is_unk_and_padding_stays_on_the_right(tok):
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)
    assert tok.padding_side == "right"
    batch = tok(["你好", "hello world, how are you"], padding=True)
    short = tok.encode("你好")
    padding = len(batch["input_ids"][1]) - len(short)
    assert batch["input_ids"][0] == short + [0] * padding
    assert batch["attention_mask"][0] == [1] * len(short) + [0] * padding


def test_add_bos_and_eos_tokens_are_honoured(tmp_path):
    folder = _official_folder(tmp_path, "7b")
    tok = BaichuanTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
    body = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [1, *body, 2]
    assert tok("hi", "hi")["input_ids"] == [1, *body, 2, 1, *body, 2]
    assert tok.get_special_tokens_mask(body) == [1] + [0] * len(body) + [1]
    pair = tok("hi", "hi", return_token_type_ids=True)["token_type_ids"]
    assert pair == [0] * (len(body) + 2) + [1] * (len(body) + 2)


def test_vocab_lookups(tok, sp):
    assert tok.vocab_size == len(tok) == sp.get_piece_size() == 125_696
    vocab = tok.get_vocab()
    assert vocab["<reserved_106>"] == 195
    assert vocab["<0xE4>"] == 1089 + 0xE4
    assert tok.convert_tokens_to_ids(["<s>", "\n", "▁hello"]) == [1, 5, sp.piece_to_id("▁hello")]
    assert tok.convert_ids_to_tokens([0, 196, 1089]) == ["<unk>", "<reserved_107>", "<0x00>"]


def test_token_bytes_maps_each_id_to_its_decoded_bytes(tok, sp):
    table = tok.token_bytes()
    assert len(table) == len(tok)
    assert table[1089 + 0xE4] == b"\xe4"
    assert table[sp.piece_to_id("▁hello")] == b" hello"
    assert table[5] == b"\n"
    assert table[195] == b"<reserved_106>"
    assert table[:3] == (b"<unk>", b"<s>", b"</s>")
    assert tok.token_bytes(skip_special_tokens=True)[:4] == (b"", b"", b"", b"<SEP>")


def test_token_bytes_table_is_built_once(tok):
    assert tok.token_bytes(True) is tok.token_bytes(True)


def test_token_bytes_covers_tokens_added_after_it_was_built(tmp_path):
    tok = BaichuanTokenizer.from_pretrained(_official_folder(tmp_path, "7b"))
    tok.token_bytes()
    tok.add_tokens(["<tool_call>"])
    new_id = tok.convert_tokens_to_ids("<tool_call>")
    assert new_id == 125_696
    assert tok.token_bytes()[new_id] == b"<tool_call>"


def test_pickle_round_trip_keeps_behaviour(tok):
    text = "pickle 百川 😀\n"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(clone.encode(text)) == text


def test_save_pretrained_round_trips(tmp_path):
    source = _official_folder(tmp_path / "official", "7b")
    tok = BaichuanTokenizer.from_pretrained(source, add_bos_token=True)
    tok.save_pretrained(tmp_path / "saved")
    again = BaichuanTokenizer.from_pretrained(tmp_path / "saved")
    text = "<reserved_106>保存 and reload</s>"
    assert again.encode(text) == tok.encode(text)
    assert again.encode("x")[0] == 1
    assert (again.add_bos_token, again.add_eos_token) == (True, False)
    assert (again.pad_token_id, again.unk_token_id, again.eos_token_id) == (0, 0, 2)
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "auto_map" not in config


@pytest.mark.parametrize("with_config", [True, False], ids=["checkpoint", "tokenizer-only"])
def test_auto_tokenizer_loads_official_folder_without_running_its_code(tmp_path, with_config):
    import langchain_baichuan2.modeling  # noqa: F401  (registers "baichuan")

    folder = _official_folder(tmp_path, "7b", with_config=with_config)
    # The official auto_map points here; importing it would leave a marker file.
    (folder / "tokenization_baichuan.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').touch()\n"
    )
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok) is BaichuanTokenizer
    assert tok.encode("a\n<reserved_106></s>") == [92314, 5, 195, 2]
    assert not (folder / "IMPORTED").exists()
