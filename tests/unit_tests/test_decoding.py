"""Streaming detokenizer (real tokenizer) and stop-string matcher."""

import random
import shutil
from pathlib import Path

import pytest

from langchain_baichuan2.decoding import IncrementalDecoder, StopStringMatcher
from langchain_baichuan2.modeling.tokenization import BaichuanTokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "baichuan2"
BYTE_BASE = 1089  # id of <0x00>


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> BaichuanTokenizer:
    if not (SHARED / "tokenizer.model").is_file():
        pytest.skip(f"real Baichuan2 tokenizer.model not found at {SHARED}")
    folder = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / "7b" / name, folder / name)
    shutil.copy(SHARED / "tokenizer.model", folder / "tokenizer.model")
    return BaichuanTokenizer.from_pretrained(folder)


def _stream_and_check(tok: BaichuanTokenizer, ids: list[int], skip: bool) -> list[str]:
    """Streams ids one at a time, checking the invariant after each; returns the deltas."""
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
    deltas = []
    for k in range(len(ids)):
        deltas.append(decoder.push(ids[k : k + 1]))
        full = tok.decode(ids[: k + 1], skip_special_tokens=skip)
        so_far = "".join(deltas)
        # Only an unfinished character may be missing; decode shows it as U+FFFD per byte.
        assert full.startswith(so_far)
        assert set(full[len(so_far) :]) <= {"\ufffd"}
        assert len(full) - len(so_far) <= 3
    deltas.append(decoder.flush())
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    return deltas


@pytest.mark.parametrize(
    "text",
    [
        "百川智能发布了新一代开源大语言模型,支持中英双语。",
        "emoji 😀👍🏽🇨🇳 mixed with 中文 and 𠮷野家",
        "<reserved_106>你好\n<reserved_107>Hello!</s>",
    ],
)
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.real_tokenizer
def test_deltas_join_to_full_decode(tok, text, skip):
    deltas = _stream_and_check(tok, tok.encode(text), skip)
    if not skip:
        assert "".join(deltas) == text


@pytest.mark.real_tokenizer
def test_four_byte_emoji_is_emitted_whole_on_its_last_byte(tok):
    ids = [BYTE_BASE + b for b in "😀".encode()]
    decoder = IncrementalDecoder(tok)
    assert [decoder.push([i]) for i in ids] == ["", "", "", "😀"]
    assert decoder.flush() == ""


@pytest.mark.real_tokenizer
def test_chinese_character_split_across_byte_tokens_is_not_emitted_half(tok):
    first, second, third = (BYTE_BASE + b for b in "中".encode())
    decoder = IncrementalDecoder(tok)
    assert decoder.push([tok.encode("a")[0], first]) == "a"
    assert decoder.push([second]) == ""
    assert decoder.push([third, 5]) == "中\n"


@pytest.mark.real_tokenizer
def test_unfinished_character_at_end_flushes_like_decode(tok):
    ids = [BYTE_BASE + b for b in "中".encode()[:2]]
    decoder = IncrementalDecoder(tok)
    assert decoder.push(ids) == ""
    # SentencePiece writes one U+FFFD per byte it cannot decode.
    assert decoder.flush() == tok.decode(ids) == "\ufffd\ufffd"


@pytest.mark.real_tokenizer
def test_special_tokens_are_skipped_or_literal_as_asked(tok):
    ids = [1, *tok.encode("hi"), 2]
    assert IncrementalDecoder(tok, skip_special_tokens=True).push(ids) == "hi"
    assert IncrementalDecoder(tok, skip_special_tokens=False).push(ids) == "<s>hi</s>"


@pytest.mark.real_tokenizer
def test_random_id_sequences_stream_to_full_decode(tok):
    rng = random.Random(1234)
    for _ in range(200):
        ids = [
            rng.choice(
                [
                    rng.randrange(tok.vocab_size),
                    rng.randrange(BYTE_BASE, BYTE_BASE + 256),
                    rng.randrange(BYTE_BASE + 0x80, BYTE_BASE + 256),  # lead/continuation
                    rng.randrange(3),
                    rng.randrange(3, BYTE_BASE),
                ]
            )
            for _ in range(rng.randint(1, 24))
        ]
        _stream_and_check(tok, ids, skip=rng.random() < 0.5)


@pytest.mark.real_tokenizer
def test_pushing_all_ids_at_once_equals_pushing_one_by_one(tok):
    ids = tok.encode("一次性 push 😀 全部")
    decoder = IncrementalDecoder(tok)
    assert decoder.push(ids) + decoder.flush() == tok.decode(ids)


def _reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cuts text at the stop string that ends first (earliest start on a tie)."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0:
            key = (start + len(stop), start)
            best = key if best is None or key < best else best
    return (text, False) if best is None else (text[: best[1]], True)


def _run(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    emitted, stopped = [], False
    for piece in pieces:
        out, stopped = matcher.push(piece)
        emitted.append(out)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return emitted, stopped


def test_stop_string_split_across_pushes_is_caught():
    matcher = StopStringMatcher(["Observation:"])
    assert matcher.push("Thought: done. Obs") == ("Thought: done. ", False)
    assert matcher.push("erva") == ("", False)
    assert matcher.push("tion: 42") == ("", True)


def test_stop_string_in_first_push_stops_immediately():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("</s>and more") == ("", True)
    assert matcher.push("ignored") == ("", True)
    assert matcher.flush() == ""


def test_partial_prefix_that_is_not_a_stop_is_emitted():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("ST") == ("", False)
    assert matcher.push("O") == ("", False)
    assert matcher.push("RM!") == ("STORM!", False)
    assert matcher.flush() == ""


def test_held_back_prefix_is_returned_by_flush():
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.push("bye\nUs") == ("bye", False)
    assert matcher.flush() == "\nUs"


def test_earliest_stop_string_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)


def test_stop_that_completes_first_wins_over_one_that_started_earlier():
    # Streaming stops as soon as "y" completes, before "xyz" could.
    assert StopStringMatcher(["xyz", "y"]).push("xyz") == ("x", True)
    # Both complete on "c": the one that started first cuts the text.
    assert StopStringMatcher(["bc", "abc"]).push("abc") == ("", True)


def test_overlapping_false_start_still_finds_stop():
    matcher = StopStringMatcher(["abab"])
    assert matcher.push("aba") == ("", False)
    assert matcher.push("cabab") == ("abac", True)


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_single_string_instead_of_list_is_rejected():
    with pytest.raises(TypeError, match="sequence of strings"):
        StopStringMatcher("STOP")


def test_result_does_not_depend_on_how_text_is_chunked():
    rng = random.Random(7)
    alphabet = "ab c\n你"
    for _ in range(500):
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, stopped = _run(StopStringMatcher(stops), pieces)
        assert ("".join(emitted), stopped) == _reference_stop(text, stops)
