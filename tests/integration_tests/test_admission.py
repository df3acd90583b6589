"""Native admission: the context limit, the memory budget, out of memory and NaN."""

import pytest
import torch

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.base import SamplingParams, merge_chunks
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint

from .tiny import run_together, stream_in_background


def params(new_tokens, forced=0, **kwargs):
    """Greedy, no repetition penalty; ``forced`` tokens before eos may end it."""
    extra = (("min_new_tokens", forced),) if forced else ()
    return SamplingParams(max_new_tokens=new_tokens, repetition_penalty=1.0, extra=extra, **kwargs)


def generated(loaded, ids, new_tokens, forced=0):
    """Greedy tokens from transformers' ``generate()`` on ``ids`` (no cache tricks)."""
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=forced,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=2,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def prompt(n, start=3):
    return [195, *(start + i % 900 for i in range(n - 2)), 196]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A RoPE checkpoint whose context is 64 positions."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ctx64"), "7b", model_max_length=64)


@pytest.fixture
def loaded(tiny_7b):
    return load_model_and_tokenizer(tiny_7b)


def test_a_prompt_longer_than_the_context_is_refused_with_the_numbers(short_context):
    engine = NativeEngine(load_model_and_tokenizer(short_context))
    try:
        with pytest.raises(ValueError, match=r"prompt \(length 70\) is longer than the maximum "):
            list(engine.stream(prompt(70), params(4)))
        with pytest.raises(ValueError, match="maximum model length of 64"):
            list(engine.stream(prompt(65), params(4)))
        assert merge_chunks(engine.stream(prompt(64), params(4))).completion_tokens == 1
        assert merge_chunks(engine.stream(prompt(10), params(3, forced=3))).completion_tokens == 3
    finally:
        engine.shutdown()


def test_raising_model_max_length_past_the_context_does_not_run_a_longer_prompt(short_context):
    llm = ChatBaichuan2(model=str(short_context), temperature=0, max_tokens=4, model_max_length=500)
    with pytest.raises(ValueError, match="is longer than the maximum model length of 64"):
        llm.invoke("word " * 100)
    assert llm.invoke("hi").usage_metadata["output_tokens"] >= 1  # the engine serves on


def test_output_stops_at_the_context_with_finish_reason_length(short_context):
    loaded = load_model_and_tokenizer(short_context)
    engine = NativeEngine(loaded)
    try:
        ids = prompt(50)
        reply = merge_chunks(engine.stream(ids, params(100, forced=100)))
    finally:
        engine.shutdown()
    assert reply.finish_reason == "length"
    assert reply.completion_tokens == 64 - 50
    assert reply.token_ids == generated(loaded, ids, 14, forced=14)


def test_a_budget_of_two_rows_runs_four_requests_two_at_a_time_with_their_alone_answers(
    loaded, monkeypatch
):
    probe = NativeEngine(loaded)
    position_bytes = probe.slot_model.cache.position_bytes
    probe.shutdown()
    # Each request reserves at most 40 positions: the buffers hold 256, so 2 rows fit.
    engine = NativeEngine(loaded, kv_cache_bytes=2 * 256 * position_bytes)
    rows = []
    original = NativeEngine._step

    def spy(self, batch):
        rows.append(len(batch.rows))
        return original(self, batch)

    monkeypatch.setattr(NativeEngine, "_step", spy)
    requests = [(prompt(10 + 4 * i, start=7 * i + 3), params(16, forced=8 + i)) for i in range(4)]
    try:
        results = run_together(engine, requests)
    finally:
        engine.shutdown()
    for (ids, p), result in zip(requests, results, strict=True):
        assert not isinstance(result, Exception), result
        forced = dict(p.extra)["min_new_tokens"]
        assert result.token_ids == generated(loaded, ids, 16, forced=forced)
    assert max(rows) == 2
    assert engine.slot_model.cache.rows == 2


def test_a_request_that_cannot_fit_the_budget_alone_is_refused_with_the_numbers(loaded):
    probe = NativeEngine(loaded)
    position_bytes = probe.slot_model.cache.position_bytes
    probe.shutdown()
    engine = NativeEngine(loaded, kv_cache_bytes=100 * position_bytes)
    try:
        with pytest.raises(ValueError, match="needs 120 positions .* holds for one request"):
            list(engine.stream(prompt(20), params(100)))
        assert merge_chunks(engine.stream(prompt(20), params(8, forced=8))).completion_tokens == 8
    finally:
        engine.shutdown()


def test_the_slot_is_sized_at_admission_so_buffers_never_grow_while_decoding(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    shapes = []
    original = type(engine.slot_model).decode

    def spy(self, *args):
        shapes.append((self.cache.generation, self.cache.rows, self.cache.length))
        return original(self, *args)

    monkeypatch.setattr(type(engine.slot_model), "decode", spy)
    ids = prompt(20)
    try:
        reply = merge_chunks(engine.stream(ids, params(300, forced=300)))
    finally:
        engine.shutdown()
    assert reply.completion_tokens == 300  # crossed 256 positions while decoding
    assert len(set(shapes)) == 1 and shapes[0][2] >= 320
    assert reply.token_ids == generated(loaded, ids, 300, forced=300)


def test_out_of_memory_while_admitting_fails_only_the_newcomer(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    running = prompt(20)
    expected = generated(loaded, running, 300, forced=300)
    worker, first_chunk, outcome = stream_in_background(engine, running, params(300, forced=300))
    try:
        assert first_chunk.wait(60)
        cache = engine.slot_model.cache

        def no_memory(*args):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(cache, "_empty", no_memory)  # any growth of the buffers fails
        with pytest.raises(torch.OutOfMemoryError, match="starting this request .* go on"):
            list(engine.stream(prompt(700), params(8)))  # needs longer buffers
        worker.join(120)
        monkeypatch.undo()
        assert outcome["reply"].token_ids == expected
        assert outcome["reply"].finish_reason == "length"
        assert merge_chunks(engine.stream(prompt(700), params(4))).completion_tokens == 4
    finally:
        engine.shutdown()


def test_out_of_memory_in_a_newcomers_prefill_fails_only_that_request(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    slot_model = type(engine.slot_model)
    original = slot_model.prefill

    def prefill(self, slot, ids, start, *rest):
        if len(ids) == 33:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, slot, ids, start, *rest)

    monkeypatch.setattr(slot_model, "prefill", prefill)
    requests = [(prompt(20), params(40, forced=40)), (prompt(33), params(40, forced=40))]
    try:
        ok, failed = run_together(engine, requests)
        assert isinstance(failed, torch.OutOfMemoryError)
        assert "Out of memory while starting this request (prompt of 33 tokens" in str(failed)
        assert ok.token_ids == generated(loaded, requests[0][0], 40, forced=40)
    finally:
        engine.shutdown()


def test_nan_logits_say_the_model_produced_nan_and_the_next_call_works(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    norm = loaded.model.model.norm
    original = type(norm).forward
    poisoned = {"calls": 0}

    def nan_once(self, hidden):
        out = original(self, hidden)
        if poisoned["calls"] == 0:
            poisoned["calls"] += 1
            return out * float("nan")
        return out

    ids = prompt(12)
    try:
        expected = merge_chunks(engine.stream(ids, params(6, forced=6))).token_ids
        monkeypatch.setattr(type(norm), "forward", nan_once)
        # Its NaN keys/values fill positions the next, shorter request attends (masked).
        with pytest.raises(FloatingPointError, match="the model produced NaN"):
            list(engine.stream(prompt(40), params(6, forced=6)))
        assert merge_chunks(engine.stream(ids, params(6, forced=6))).token_ids == expected
    finally:
        engine.shutdown()


def test_chat_model_budget_reaches_the_engine_and_refuses_what_cannot_fit(tiny_13b):
    from langchain_baichuan2 import ChatBaichuan2

    probe = ChatBaichuan2(model=str(tiny_13b))
    position_bytes = probe.engine().slot_model.cache.position_bytes
    probe.unload()
    llm = ChatBaichuan2(
        model=str(tiny_13b), temperature=0, max_tokens=200, kv_cache_bytes=100 * position_bytes
    )
    assert llm.engine().kv_cache_bytes == 100 * position_bytes
    with pytest.raises(ValueError, match="holds for one request"):
        llm.invoke("hello")
    assert llm.invoke("hello", max_tokens=4).content is not None  # still serving
    llm.unload()
    with pytest.raises(ValueError, match="only apply to backend='native'"):
        ChatBaichuan2(model=str(tiny_13b), backend="vllm", kv_cache_bytes=1 << 20)


def test_warming_up_a_stopped_engine_raises_instead_of_waiting_forever(loaded):
    from langchain_baichuan2.engines.base import EngineStoppedError

    engine = NativeEngine(loaded)
    engine.shutdown()
    with pytest.raises(EngineStoppedError, match="shut down"):
        engine.warm_up(timeout=5)


def test_no_memory_for_the_prefix_cache_fails_nothing(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    try:
        ids = prompt(12)
        expected = merge_chunks(engine.stream(ids, params(6, forced=6))).token_ids

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("simulated")

        monkeypatch.setattr(engine.prefix_cache, "store", out_of_memory)
        other = prompt(14, start=40)
        assert merge_chunks(engine.stream(other, params(6, forced=6))).token_ids == generated(
            loaded, other, 6, forced=6
        )
        monkeypatch.undo()
        assert merge_chunks(engine.stream(ids, params(6, forced=6))).token_ids == expected
    finally:
        engine.shutdown()


def test_the_context_is_model_max_length_within_the_rope_positions():
    from langchain_baichuan2.modeling import BaichuanConfig

    rope = BaichuanConfig(model_max_length=8192, max_position_embeddings=4096)
    assert rope.context_length == 4096
    short = BaichuanConfig(model_max_length=2048, max_position_embeddings=4096)
    assert short.context_length == 2048
    assert BaichuanConfig(model_max_length=8192).context_length == 8192  # ALiBi: no positions
