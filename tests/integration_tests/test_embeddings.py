"""Baichuan2Embeddings end to end on tiny checkpoints, against hand computations."""

import asyncio
import logging
import math
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.embeddings import Baichuan2Embeddings
from langchain_baichuan2.testing import make_tiny_checkpoint

POOLINGS = ["mean", "last", "weighted_mean"]
# Mixed lengths, Chinese and English, one empty: batches of 2 mix short and long rows.
TEXTS = [
    "short",
    "温故而知新，可以为师矣。" * 6,
    "",
    "A medium sentence about retrieval and embeddings.",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 5,
]


def close(a, b, tol=1e-5):
    return len(a) == len(b) and all(
        math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True)
    )


def hidden_states(loaded, ids, layer=None):
    """The unpadded, unmasked forward of one text: ``[seq, hidden]`` fp32."""
    with torch.inference_mode():
        out = loaded.model.model(torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    states = out.last_hidden_state if layer is None else out.hidden_states[layer]
    return states[0].float()


def encode(loaded, text):
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def norm(vector):
    return math.sqrt(sum(x * x for x in vector))


@pytest.fixture(scope="module")
def emb(tiny_7b):
    return Baichuan2Embeddings(model=str(tiny_7b), batch_size=2)


# -- padding, pooling, layers ------------------------------------------------------------


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_never_changes_a_vector(tiny_checkpoint, pooling):
    emb = Baichuan2Embeddings(model=str(tiny_checkpoint), pooling=pooling, batch_size=3)
    batched = emb.embed_documents(TEXTS)
    for text, vector in zip(TEXTS, batched, strict=True):
        assert close(vector, emb.embed_documents([text])[0])


def test_mean_pooling_equals_a_hand_computation(tiny_checkpoint):
    emb = Baichuan2Embeddings(model=str(tiny_checkpoint), normalize=False)
    loaded = emb.loaded_model()
    text = TEXTS[3]
    expected = hidden_states(loaded, encode(loaded, text)).mean(dim=0)
    assert close(emb.embed_documents([TEXTS[1], text])[1], expected.tolist())


def test_weighted_mean_weighs_token_i_of_n_by_i(emb):
    weighted = emb.model_copy(update={"pooling": "weighted_mean", "normalize": False})
    loaded = emb.loaded_model()
    states = hidden_states(loaded, encode(loaded, TEXTS[3]))
    weights = torch.arange(1, states.shape[0] + 1, dtype=torch.float32)
    expected = (weights[:, None] * states).sum(dim=0) / weights.sum()
    assert close(weighted.embed_documents([TEXTS[1], TEXTS[3]])[1], expected.tolist())


def test_last_pooling_picks_the_last_real_token_under_padding(tiny_checkpoint):
    emb = Baichuan2Embeddings(model=str(tiny_checkpoint), pooling="last", normalize=False)
    loaded = emb.loaded_model()
    short, long = "short", TEXTS[1]
    assert len(encode(loaded, short)) < len(encode(loaded, long))
    expected = hidden_states(loaded, encode(loaded, short))[-1]
    assert close(emb.embed_documents([long, short])[1], expected.tolist())


def test_hidden_layer_minus_two_equals_a_hand_computation(tiny_checkpoint):
    emb = Baichuan2Embeddings(model=str(tiny_checkpoint), hidden_layer=-2, normalize=False)
    loaded = emb.loaded_model()
    expected = hidden_states(loaded, encode(loaded, TEXTS[3]), layer=-2).mean(dim=0)
    final = hidden_states(loaded, encode(loaded, TEXTS[3])).mean(dim=0)
    vector = emb.embed_documents([TEXTS[1], TEXTS[3]])[1]
    assert close(vector, expected.tolist())
    assert not close(vector, final.tolist())


def test_hidden_layer_out_of_range_names_the_range(emb):
    bad = emb.model_copy(update={"hidden_layer": 7})
    with pytest.raises(ValueError, match=r"hidden_layer must be in \[-3, 2\].*got 7"):
        bad.embed_query("hello")


def test_vectors_have_unit_norm_when_normalizing(emb):
    for vector in emb.embed_documents(TEXTS):
        assert math.isclose(norm(vector), 1.0, abs_tol=1e-5)


def test_vectors_keep_their_norm_when_not_normalizing(emb):
    raw = emb.model_copy(update={"normalize": False})
    assert all(not math.isclose(norm(v), 1.0, abs_tol=1e-3) for v in raw.embed_documents(TEXTS))


def test_results_follow_the_input_order(emb):
    a, b, c = TEXTS[1], TEXTS[0], TEXTS[5]
    va, vb, vc = emb.embed_documents([a, b, c])
    wc, wa, wb = emb.embed_documents([c, a, b])
    assert close(va, wa) and close(vb, wb) and close(vc, wc)
    assert not close(va, vb)


def test_vectors_are_lists_of_python_floats_of_the_model_width(emb):
    vectors = emb.embed_documents(TEXTS[:2])
    assert len(vectors) == 2
    assert all(type(x) is float for v in vectors for x in v)
    assert len(vectors[0]) == emb.dimension == emb.loaded_model().model.config.hidden_size


# -- sharing the chat model's weights ------------------------------------------------------


def test_construction_loads_nothing():
    Baichuan2Embeddings(model="baichuan-inc/this-model-does-not-exist")


def test_chat_model_and_embeddings_configured_alike_share_one_model(tiny_7b):
    chat = ChatBaichuan2(model=str(tiny_7b))
    emb = Baichuan2Embeddings(model=str(tiny_7b), pooling="last")
    assert emb.loaded_model() is chat.loaded_model()
    assert emb.loaded_model().model is chat.loaded_model().model


def test_from_chat_model_shares_the_model_and_takes_other_fields(tiny_7b):
    chat = ChatBaichuan2(model=str(tiny_7b), dtype="float32", temperature=0)
    emb = Baichuan2Embeddings.from_chat_model(chat, pooling="weighted_mean")
    assert (emb.model, emb.dtype, emb.pooling) == (str(tiny_7b), "float32", "weighted_mean")
    assert emb.loaded_model().model is chat.loaded_model().model


def rss_bytes():
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc/self/status (Linux) to read the resident set size")
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_embedding_with_the_chat_models_weights_does_not_double_memory(tmp_path):
    folder = make_tiny_checkpoint(
        tmp_path, "7b", hidden_size=384, num_hidden_layers=4, intermediate_size=1024
    )
    chat = ChatBaichuan2(model=str(folder))
    loaded = chat.loaded_model()
    weight_bytes = sum(loaded.memory_footprint.values())
    # Page in every weight (they may be memory-mapped) and warm the kernels first.
    with torch.inference_mode():
        for tensor in loaded.model.state_dict().values():
            tensor.sum()
        loaded.model.model(torch.tensor([[5, 6, 7]]), use_cache=False)
    before = rss_bytes()
    Baichuan2Embeddings(model=str(folder)).embed_documents(["a few words"] * 4)
    assert rss_bytes() - before < weight_bytes / 2


# -- instructions and truncation ------------------------------------------------------------


def test_query_instruction_changes_the_query_as_if_prefixed(emb):
    instructed = emb.model_copy(update={"query_instruction": "Represent this query: "})
    question = "what is an embedding?"
    assert not close(instructed.embed_query(question), emb.embed_query(question))
    assert close(
        instructed.embed_query(question),
        emb.embed_documents(["Represent this query: " + question])[0],
    )
    assert close(instructed.embed_documents([question])[0], emb.embed_query(question))


def test_document_instruction_prefixes_documents_only(emb):
    instructed = emb.model_copy(update={"document_instruction": "Passage: "})
    assert close(instructed.embed_documents(["text"])[0], emb.embed_documents(["Passage: text"])[0])
    assert close(instructed.embed_query("text"), emb.embed_query("text"))


def test_long_texts_are_truncated_with_one_warning_naming_the_count(emb, caplog):
    short = emb.model_copy(update={"max_length": 5, "normalize": False})
    loaded = emb.loaded_model()
    texts = [TEXTS[1], "hi", TEXTS[5], TEXTS[3]]
    with caplog.at_level(logging.WARNING, logger="langchain_baichuan2.embeddings"):
        vectors = short.embed_documents(texts)
    warnings = [r for r in caplog.records if r.name == "langchain_baichuan2.embeddings"]
    assert len(warnings) == 1
    assert "3 of 4 texts" in warnings[0].getMessage()
    assert "max_length=5" in warnings[0].getMessage()
    for text, vector in zip(texts, vectors, strict=True):
        kept = encode(loaded, text)[:5]
        assert close(vector, hidden_states(loaded, kept).mean(dim=0).tolist())


def test_texts_within_max_length_do_not_warn(emb, caplog):
    with caplog.at_level(logging.WARNING, logger="langchain_baichuan2.embeddings"):
        emb.embed_documents(TEXTS)
    assert not caplog.records


# -- edge cases --------------------------------------------------------------------------------


def test_empty_list_gives_empty_list(emb):
    assert emb.embed_documents([]) == []


def test_empty_string_is_embedded_as_the_eos_token(emb):
    loaded = emb.loaded_model()
    raw = emb.model_copy(update={"normalize": False})
    vector = raw.embed_query("")
    assert all(math.isfinite(x) for x in vector)
    eos = loaded.tokenizer.eos_token_id
    assert close(vector, hidden_states(loaded, [eos])[0].tolist())


def test_a_non_string_item_names_its_index_and_type(emb):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        emb.embed_documents(["fine", 3])
    with pytest.raises(TypeError, match=r"must be a str, got NoneType"):
        emb.embed_query(None)


def test_unknown_pooling_is_rejected_at_construction_naming_the_choices():
    with pytest.raises(ValidationError, match="'mean', 'last' or 'weighted_mean'"):
        Baichuan2Embeddings(model="baichuan-inc/Baichuan2-7B-Chat", pooling="max")


@pytest.mark.parametrize("field", ["batch_size", "max_length"])
def test_sizes_below_one_are_rejected(field):
    with pytest.raises(ValidationError, match=field):
        Baichuan2Embeddings(model="baichuan-inc/Baichuan2-7B-Chat", **{field: 0})


# -- async -------------------------------------------------------------------------------------


async def test_async_results_equal_the_sync_results(emb):
    assert await emb.aembed_documents(TEXTS) == emb.embed_documents(TEXTS)
    assert await emb.aembed_query("hello") == emb.embed_query("hello")


async def test_async_embedding_does_not_block_the_event_loop(emb, monkeypatch):
    original = Baichuan2Embeddings._embed_batch

    def slow_batch(self, loaded, batch_ids, *rest):
        time.sleep(0.05)  # a slow model: blocking here would freeze a blocked loop
        return original(self, loaded, batch_ids, *rest)

    monkeypatch.setattr(Baichuan2Embeddings, "_embed_batch", slow_batch)
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await emb.aembed_documents(TEXTS)  # 3 batches of 2: >= 0.15 s of model time
    await emb.aembed_query("hello")
    done.set()
    await task
    assert ticks >= 10


# -- progress ----------------------------------------------------------------------------------


def test_progress_bar_is_shown_when_asked(emb, capsys):
    emb.model_copy(update={"show_progress": True}).embed_documents(TEXTS)
    err = capsys.readouterr().err
    assert "Embedding" in err and "3/3" in err


def test_progress_bar_is_hidden_by_default_off_a_terminal(emb, capsys):
    emb.embed_documents(TEXTS)
    assert "Embedding" not in capsys.readouterr().err


def test_progress_bar_is_hidden_for_a_single_batch(emb, capsys):
    emb.model_copy(update={"show_progress": True}).embed_documents(TEXTS[:2])
    assert "Embedding" not in capsys.readouterr().err
