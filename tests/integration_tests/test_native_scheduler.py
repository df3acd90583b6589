"""The native scheduler: warm-up, admission order, gather groups and the one memory budget."""

import contextvars
import threading
import time
import warnings

import pytest
import torch

from langchain_baichuan2.engines.base import SamplingParams, merge_chunks
from langchain_baichuan2.engines.native import NativeEngine, engine_for
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint

from .tiny import run_together


def prompt(n, start=3):
    return [195, *(start + i % 900 for i in range(n - 2)), 196]


def forced(new_tokens):
    """Greedy, exactly ``new_tokens`` tokens."""
    return SamplingParams(
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        extra=(("min_new_tokens", new_tokens),),
    )


@pytest.fixture
def loaded(tiny_7b):
    return load_model_and_tokenizer(tiny_7b)


@pytest.fixture
def position_bytes(loaded):
    probe = NativeEngine(loaded)
    probe.shutdown()
    return probe.slot_model.cache.position_bytes


def rows_per_step(monkeypatch):
    """Record the rows of every decode step (and never let one run on an empty batch)."""
    rows = []
    original = NativeEngine._step

    def spy(self, batch):
        rows.append(len(batch.rows))
        return original(self, batch)

    monkeypatch.setattr(NativeEngine, "_step", spy)
    return rows


def collect(engine, request, log, name):
    """Read a submitted request to its end; log its first chunk and its end, in order."""
    chunks = [engine._wait(request, None)]
    log.append(f"{name} started")
    while chunks[-1].finish_reason is None:
        chunks.append(engine._wait(request, None))
    log.append(f"{name} done")
    return merge_chunks(iter(chunks))


def test_warm_up_asked_while_a_batch_decodes_runs_when_it_ends(loaded):
    engine = NativeEngine(loaded, compile=False)
    first_chunk = threading.Event()
    done = {}

    def run_long():
        for chunk in engine.stream(prompt(20), forced(300)):
            first_chunk.set()
            done["long"] = chunk.finish_reason

    worker = threading.Thread(target=run_long)
    worker.start()
    try:
        assert first_chunk.wait(60)
        # No other request arrives: the warm-up must not wait for one.
        engine.warm_up(timeout=30)
        worker.join(60)
        assert done["long"] == "length"
        assert engine.slot_model.cache.fixed
    finally:
        engine.shutdown()


def test_a_first_row_that_fails_to_join_leaves_no_empty_batch_to_step(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    steps = rows_per_step(monkeypatch)
    slot_model = type(engine.slot_model)
    original = slot_model.prefill
    calls = {"n": 0}

    def wrong_width(self, slot, ids, start, *rest):
        logits = original(self, slot, ids, start, *rest)
        calls["n"] += 1
        return torch.cat([logits, logits[:, :1]], dim=1) if calls["n"] == 1 else logits

    monkeypatch.setattr(slot_model, "prefill", wrong_width)  # the batch cannot take it
    try:
        with pytest.raises(RuntimeError):
            list(engine.stream(prompt(12), forced(4)))
        assert merge_chunks(engine.stream(prompt(12), forced(4))).completion_tokens == 4
    finally:
        engine.shutdown()
    assert steps and min(steps) >= 1  # no step ran on a batch without rows


def test_a_second_budget_for_a_running_engine_warns_with_both_values(loaded):
    engine = engine_for(loaded)
    try:
        with pytest.warns(UserWarning, match=rf"kv_cache_bytes=12345.*{engine.kv_cache_bytes}"):
            assert engine_for(loaded, kv_cache_bytes=12345) is engine
        with pytest.warns(UserWarning, match=r"max_rows=3 .*max_rows=64"):
            engine_for(loaded, max_rows=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            engine_for(loaded, kv_cache_bytes=engine.kv_cache_bytes)  # the same: no warning
            engine_for(loaded)  # no preference: no warning
            engine_for(loaded, compile=True)  # honoured: the engine switches
            engine_for(loaded, prefix_cache_tokens=100)  # honoured: the cap grows
        assert engine.prefix_cache.budget_tokens == 100
        assert engine.slot_model.compile
        engine_for(loaded, compile=False)
        assert not engine.slot_model.compile
    finally:
        engine.shutdown()


def test_a_chat_model_with_another_budget_for_a_loaded_model_warns(tmp_path):
    from langchain_baichuan2 import ChatBaichuan2

    folder = make_tiny_checkpoint(tmp_path / "own", "7b")
    first = ChatBaichuan2(model=str(folder), max_tokens=2)
    running = first.engine().kv_cache_bytes
    second = ChatBaichuan2(model=str(folder), max_tokens=2, kv_cache_bytes=running // 2)
    with pytest.warns(UserWarning, match=rf"kv_cache_bytes={running // 2}.*{running}"):
        second.invoke("hi")
    first.unload()


def test_a_waiting_request_that_does_not_fit_lets_smaller_ones_pass_but_not_forever(
    loaded, position_bytes
):
    # Two rows of 256 positions: a 420-position request cannot join a running one.
    engine = NativeEngine(loaded, kv_cache_bytes=2 * 256 * position_bytes)
    passes = engine.MAX_PASSES
    log = []
    results = {}
    try:
        running = engine._submit(prompt(20), forced(200), None)
        reader = threading.Thread(
            target=lambda: results.update(long=collect(engine, running, log, "long"))
        )
        reader.start()
        while "long started" not in log:
            time.sleep(0.005)
        big = engine._submit(prompt(20, start=300), forced(400), None)
        small = [
            engine._submit(prompt(10, start=20 * i + 3), forced(4), None) for i in range(passes + 2)
        ]
        readers = [
            threading.Thread(
                target=lambda r=r, n=n: results.update({n: collect(engine, r, log, n)})
            )
            for r, n in [(big, "big"), *[(r, f"small {i}") for i, r in enumerate(small)]]
        ]
        for thread in [*readers]:
            thread.start()
        for thread in [reader, *readers]:
            thread.join(120)
    finally:
        engine.shutdown()
    assert results["big"].completion_tokens == 400
    assert all(results[f"small {i}"].completion_tokens == 4 for i in range(passes + 2))
    # The first MAX_PASSES small requests ran beside the long one, ahead of the big one.
    for i in range(passes):
        assert log.index(f"small {i} done") < log.index("long done")
    # Then the big one stopped being passed: the rest waited until it started.
    assert log.index("big started") < log.index(f"small {passes} started")


def test_two_overlapping_gathers_each_remove_their_own_group(loaded):
    engine = NativeEngine(loaded)
    first, second = contextvars.copy_context(), contextvars.copy_context()
    groups = [engine.gather(2), engine.gather(2)]  # equal counts: equal by value
    try:
        second.run(groups[1].__enter__)
        first.run(groups[0].__enter__)
        first.run(groups[0].__exit__, None, None, None)
        requests = [second.run(engine._submit, prompt(8), forced(2), None) for _ in range(3)]
        assert all(g.remaining >= 0 for g in engine._gathers)  # a retry never goes below 0
        second.run(groups[1].__exit__, None, None, None)  # raised "x not in list" before
        assert engine._gathers == []
        for request in requests:
            while engine._wait(request, None).finish_reason is None:
                pass
    finally:
        engine.shutdown()


def test_a_group_that_never_fills_delays_later_requests_at_most_once(loaded):
    engine = NativeEngine(loaded)
    context = contextvars.copy_context()
    group = engine.gather(3)  # two of its three inputs never come (held back or failed)
    try:
        context.run(group.__enter__)
        request = context.run(engine._submit, prompt(8), forced(2), None)
        while engine._wait(request, None).finish_reason is None:
            pass
        start = time.monotonic()
        for i in range(3):
            assert merge_chunks(engine.stream(prompt(8, start=50 + i), forced(2))).token_ids
        assert time.monotonic() - start < 2.0  # not GATHER_TIMEOUT (1 s) per request
        context.run(group.__exit__, None, None, None)
    finally:
        engine.shutdown()


def test_a_tight_budget_runs_short_requests_together_again_after_a_long_one(
    loaded, position_bytes, monkeypatch
):
    # Eight rows of 256 positions, or two of 1024.
    engine = NativeEngine(loaded, kv_cache_bytes=8 * 256 * position_bytes)
    steps = rows_per_step(monkeypatch)
    short = [(prompt(10, start=30 * i + 3), forced(12)) for i in range(8)]
    try:
        before = run_together(engine, short)
        assert max(steps) == 8
        long = merge_chunks(engine.stream(prompt(20, start=500), forced(1000)))
        assert long.completion_tokens == 1000
        steps.clear()
        after = run_together(engine, short)
        assert max(steps) == 8
    finally:
        engine.shutdown()
    assert [r.token_ids for r in after] == [r.token_ids for r in before]


def test_the_prefix_cache_holds_only_what_the_running_requests_leave_of_the_budget(
    loaded, position_bytes, monkeypatch
):
    budget_bytes = 1024 * position_bytes
    engine = NativeEngine(loaded, kv_cache_bytes=budget_bytes)
    engine.set_prefix_cache_tokens(4096)
    prefix = engine.prefix_cache
    held = []
    original = type(engine.slot_model).decode

    def spy(self, *args):
        buffers = self.cache.rows * self.cache.length
        held.append((buffers + prefix.stored_tokens) * position_bytes)
        return original(self, *args)

    monkeypatch.setattr(type(engine.slot_model), "decode", spy)
    try:
        for i in range(5):  # 5 x 200 prompt tokens kept for reuse: more than the room left
            merge_chunks(engine.stream(prompt(200, start=100 * i + 3), forced(4)))
        assert 0 < prefix.stored_tokens <= 1024 - engine.slot_model.cache.length
        merge_chunks(engine.stream(prompt(20, start=700), forced(900)))  # buffers of 1024
        assert prefix.stored_tokens == 0
    finally:
        engine.shutdown()
    assert max(held) <= budget_bytes


def test_buffers_sized_once_leave_the_prefix_cache_its_share(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ctx512", "7b", model_max_length=512)
    loaded = load_model_and_tokenizer(folder)
    probe = NativeEngine(loaded)
    probe.shutdown()
    position_bytes = probe.slot_model.cache.position_bytes
    engine = NativeEngine(loaded, compile=False, kv_cache_bytes=4 * 512 * position_bytes)
    try:
        engine.set_prefix_cache_tokens(1024)
        engine.warm_up(timeout=60)
        cache = engine.slot_model.cache
        assert (cache.rows, cache.length) == (2, 512)  # two rows of 512 left for the cache
        merge_chunks(engine.stream(prompt(300), forced(4)))
        assert engine.prefix_cache.stored_tokens > 0
    finally:
        engine.shutdown()
