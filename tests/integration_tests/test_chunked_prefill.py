"""Chunked prefill: prompts fed a chunk per worker iteration, between decode steps."""

import time

import pytest
import torch

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.base import merge_chunks
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_adapter

from .test_admission import generated, params, prompt
from .tiny import run_together, stream_in_background

CHUNK = 16


@pytest.fixture(scope="module", params=["7b", "13b"])
def checkpoint(request, tiny_7b, tiny_13b):
    return {"7b": tiny_7b, "13b": tiny_13b}[request.param]


def record_calls(engine, monkeypatch):
    """Log every prefill (``("prefill", start, tokens)``) and decode step (``("decode", rows)``)."""
    calls = []
    slot_model = type(engine.slot_model)
    prefill, decode = slot_model.prefill, slot_model.decode

    def prefill_spy(self, slot, ids, start, *rest):
        calls.append(("prefill", start, len(ids)))
        return prefill(self, slot, ids, start, *rest)

    def decode_spy(self, slots, *rest):
        calls.append(("decode", len(slots)))
        return decode(self, slots, *rest)

    monkeypatch.setattr(slot_model, "prefill", prefill_spy)
    monkeypatch.setattr(slot_model, "decode", decode_spy)
    return calls


def test_greedy_text_is_the_same_with_chunking_on_and_off(checkpoint, tmp_path):
    loaded = load_model_and_tokenizer(checkpoint)
    adapter = str(make_tiny_adapter(checkpoint, tmp_path / "lora", ("W_pack", "o_proj"), 2))
    long_prompt = prompt(150)
    requests = [
        (long_prompt, params(12, forced=12)),
        (prompt(40, start=300), params(12, forced=12, adapter=adapter)),
        (prompt(70, start=600), params(12, forced=12)),
    ]
    # A prompt that extends the first one reuses its stored keys, then is fed in chunks.
    follow_up = [*long_prompt, *range(700, 760)]
    replies = {}
    for chunk in (0, CHUNK):  # chunked: fed between decode steps of the other rows
        engine = NativeEngine(loaded, prefill_chunk_tokens=chunk)
        engine.set_prefix_cache_tokens(1000)
        try:
            together = run_together(engine, requests)
            again = merge_chunks(engine.stream(follow_up, params(12, forced=12)))
        finally:
            engine.shutdown()
        replies[chunk] = [r.token_ids for r in together] + [again.token_ids]
        assert again.cached_prompt_tokens >= 150
    assert replies[CHUNK] == replies[0]
    assert replies[CHUNK][0] == generated(loaded, long_prompt, 12, forced=12)
    assert replies[CHUNK][3] == generated(loaded, follow_up, 12, forced=12)


def test_a_running_stream_gets_a_token_between_every_two_chunks(tiny_7b, monkeypatch):
    loaded = load_model_and_tokenizer(tiny_7b)
    engine = NativeEngine(loaded, prefill_chunk_tokens=CHUNK)
    calls = record_calls(engine, monkeypatch)
    running, long_prompt = prompt(12), prompt(200, start=400)
    worker, first_token, outcome = stream_in_background(engine, running, params(80, forced=80))
    try:
        assert first_token.wait(60)
        long_reply = merge_chunks(engine.stream(long_prompt, params(5, forced=5)))
        worker.join(120)
        calls_while_running = list(calls)
        alone = merge_chunks(engine.stream(running, params(80, forced=80)))
    finally:
        engine.shutdown()
    calls = calls_while_running
    chunks = [i for i, call in enumerate(calls) if call[0] == "prefill"][1:]  # the long prompt's
    assert [calls[i][1:] for i in chunks] == [(s, min(CHUNK, 200 - s)) for s in range(0, 200, 16)]
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert calls[before + 1 : after] == [("decode", 1)]  # one step of the running row
    assert long_reply.token_ids == generated(loaded, long_prompt, 5, forced=5)
    assert outcome["reply"].token_ids == alone.token_ids  # as when it runs alone


def test_cancelling_a_request_mid_prefill_frees_its_slot(tiny_7b, monkeypatch):
    engine = NativeEngine(load_model_and_tokenizer(tiny_7b), prefill_chunk_tokens=CHUNK)
    calls = record_calls(engine, monkeypatch)
    request = engine._submit(prompt(200), params(5), None)
    try:
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.001)
        request.cancelled.set()  # as closing the stream does
        while engine.slot_model.cache.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.slot_model.cache.used == 0
        fed = len(calls)
        assert fed < 200 // CHUNK  # stopped mid-prompt
        reply = merge_chunks(engine.stream(prompt(12), params(3, forced=3)))
    finally:
        engine.shutdown()
    assert reply.completion_tokens == 3
    assert calls[fed:][0] == ("prefill", 0, 12)  # no chunk of the cancelled prompt after it


def test_an_error_in_a_chunk_fails_only_that_request(tiny_7b, monkeypatch):
    loaded = load_model_and_tokenizer(tiny_7b)
    engine = NativeEngine(loaded, prefill_chunk_tokens=CHUNK)
    slot_model = type(engine.slot_model)
    original = slot_model.prefill

    def prefill(self, slot, ids, start, *rest):
        if start >= 40:  # a chunk in the middle of the long prompt
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, slot, ids, start, *rest)

    monkeypatch.setattr(slot_model, "prefill", prefill)
    requests = [(prompt(20), params(30, forced=30)), (prompt(120, start=500), params(5))]
    try:
        ok, failed = run_together(engine, requests)
        assert engine.slot_model.cache.used == 0
    finally:
        engine.shutdown()
    assert isinstance(failed, torch.OutOfMemoryError)
    assert "prompt of 120 tokens" in str(failed)
    assert ok.token_ids == generated(loaded, requests[0][0], 30, forced=30)


def test_the_chat_model_setting_reaches_the_engine(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), max_tokens=2, prefill_chunk_tokens=64)
    llm.invoke("hi")
    engine = llm.engine()
    assert engine.prefill_chunk_tokens == 64
    llm.model_copy(update={"prefill_chunk_tokens": 0}).invoke("hi")
    assert engine.prefill_chunk_tokens is None  # whole prompts
    llm.unload()


def stored_keys(engine, ids):
    """The prefix cache's keys/values of ``ids`` (every layer's, concatenated)."""
    reused, kv = engine.prefix_cache.lookup([*ids, 0])
    assert reused == len(ids)
    return torch.cat([torch.cat([k, v]) for k, v in kv])


def test_a_prompt_fed_into_a_slot_between_running_rows_keeps_its_keys(tiny_13b, monkeypatch):
    loaded = load_model_and_tokenizer(tiny_13b)
    long_prompt = prompt(100, start=700)
    alone = NativeEngine(loaded, prefill_chunk_tokens=0)
    alone.set_prefix_cache_tokens(4096)
    try:
        merge_chunks(alone.stream(long_prompt, params(1)))
        expected = stored_keys(alone, long_prompt)
    finally:
        alone.shutdown()
    engine = NativeEngine(loaded, prefill_chunk_tokens=CHUNK)
    engine.set_prefix_cache_tokens(4096)
    fed_slots = []
    original = type(engine.slot_model).prefill

    def prefill(self, slot, ids, start, *rest):
        fed_slots.append(slot)
        return original(self, slot, ids, start, *rest)

    monkeypatch.setattr(type(engine.slot_model), "prefill", prefill)
    prompts = [prompt(12, start=100 * i + 3) for i in range(4)]
    lengths = [40, 2, 40, 40]  # the second row ends first and frees slot 1
    try:
        with engine.gather(4):  # submitted in order: slots 0 to 3
            running = [
                engine._submit(ids, params(n, forced=n), None)
                for ids, n in zip(prompts, lengths, strict=True)
            ]
        ended = []
        while not ended or ended[-1].finish_reason is None:
            ended.append(engine._wait(running[1], None))
        merge_chunks(engine.stream(long_prompt, params(1)))
        # Fed chunk by chunk into slot 1, between steps of the rows in slots 0, 2 and 3,
        # which write a dummy token at position 0 of every slot in their range.
        assert fed_slots[-7:] == [1] * 7
        kept = stored_keys(engine, long_prompt)
        assert torch.allclose(kept[:, :, :1], expected[:, :, :1], atol=1e-5)  # position 0
        assert torch.allclose(kept, expected, atol=1e-5)
    finally:
        engine.shutdown()
