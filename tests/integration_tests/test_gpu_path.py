"""The GPU path simulated on CPU: slots re-viewed in one storage, background compile, OOM.

Nothing here needs a GPU: failures are injected, compiles are faked where only the
scheduling matters, and one real (dynamic) compile of a tiny model checks the count.
"""

import logging
import threading

import pytest
import torch

from langchain_baichuan2.engines.base import SamplingParams, merge_chunks
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.engines.native.slots import SlotCache
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint

from .tiny import run_together

CONTEXT = 1024


def greedy(new_tokens):
    return SamplingParams(
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        extra=(("min_new_tokens", new_tokens),),
    )


def prompt(n, start=3):
    return [195, *(start + i % 900 for i in range(n - 2)), 196]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("gpu-path"), "7b", model_max_length=CONTEXT
    )
    return load_model_and_tokenizer(folder)


def test_a_reshape_moves_every_taken_row_inside_the_same_storage():
    cache = SlotCache(
        [torch.device("cpu")] * 2, 2, 4, torch.float32, max_length=CONTEXT, max_rows=8
    )
    cache.budget.set_bytes(2 * CONTEXT * cache.position_bytes)  # two full-context rows
    cache.fix()
    stores = [s.data_ptr() for kind in cache._stores for s in kind]
    assert (cache.rows, cache.length) == (2, CONTEXT)
    filled = {}
    torch.manual_seed(0)

    def fill(slot, n):
        for buffer in (*cache.keys, *cache.values):
            buffer[slot, :, :n] = torch.randn(2, n, 4)
        filled[slot] = n

    def held(slot):
        n = filled[slot]
        return [buffer[slot, :, :n].clone() for buffer in (*cache.keys, *cache.values)]

    gap = cache.acquire(150)  # slot 0, freed below: the taken rows 1 and 2 both move
    fill(cache.acquire(200), 200)
    fill(cache.acquire(100), 100)  # a third row: 4 rows of 256 (the reservations fit)
    assert (cache.rows, cache.length) == (4, 256)
    cache.release(gap)
    before = {slot: held(slot) for slot in filled}
    for shape in ((8, 256), (3, 512), (4, 256), (3, 512), (3, 600)):  # grow and shrink
        cache.resize(*shape)
        assert (cache.rows, cache.length) == shape
        for slot, expected in before.items():
            for got, want in zip(held(slot), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [s.data_ptr() for kind in cache._stores for s in kind] == stores  # never reallocated
    cache.resize(3, 512)
    assert all(float(b[0].abs().sum()) == 0 for b in (*cache.keys, *cache.values))  # free
    assert all(float(b[1, :, 200:].abs().sum()) == 0 for b in cache.keys)  # past what it held
    with pytest.raises(RuntimeError, match="cannot hold 3 x 1024"):
        cache.resize(3, CONTEXT)


def decode_step(slot_model, rows):
    """Feed each (slot, ids) row its last token; append the greedy next one; return logits."""
    slots = [slot for slot, _ in rows]
    lengths = [len(ids) - 1 for _, ids in rows]
    logits = slot_model.decode(
        slots,
        max(lengths) + 1,
        torch.tensor(slots),
        torch.tensor([ids[-1] for _, ids in rows]),
        torch.tensor(lengths),
    )
    for (_, ids), row_logits in zip(rows, logits, strict=True):
        ids.append(int(row_logits.argmax()))
    return logits


def started_rows(slot_model, prompts):
    """Prefill each prompt into its own slot; rows of (slot, ids + greedy token)."""
    rows = []
    for ids in prompts:
        slot = slot_model.acquire(len(ids) + 16)
        logits = slot_model.prefill(slot, ids, 0)
        rows.append((slot, [*ids, int(logits.argmax())]))
    return rows


@torch.inference_mode()
def test_a_bucket_out_of_memory_runs_uncompiled_from_then_on(loaded, caplog):
    compiled, eager = SlotModel(loaded.model, compile=True), SlotModel(loaded.model)
    calls = []

    def fake_compiled(*arguments):  # stands in for torch.compile's step (CUDA graphs)
        calls.append(arguments[0].shape[0])
        if arguments[0].shape[0] == 2:
            raise torch.OutOfMemoryError("simulated: no memory to record a CUDA graph")
        return compiled._last_hidden(*arguments)

    compiled._compiled = fake_compiled
    prompts = [prompt(30), prompt(9, start=400)]
    rows = {name: started_rows(m, prompts) for name, m in (("c", compiled), ("e", eager))}
    seen = []
    with caplog.at_level(logging.WARNING):
        for used in ([0], [0, 1], [0, 1], [0], [0, 1]):
            got = decode_step(compiled, [rows["c"][i] for i in used])
            expected = decode_step(eager, [rows["e"][i] for i in used])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            seen.append(list(calls))
    assert rows["c"] == rows["e"]
    # One try of the 2-row bucket, never again; one-row steps stay compiled.
    assert seen == [[1], [1, 2], [1, 2], [1, 2, 1], [1, 2, 1]]
    assert compiled.eager_buckets == {(2, 256)}
    warnings = [r for r in caplog.records if "Out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "2 rows x 256 keys" in warnings[0].getMessage()
    assert not compiled.compile_failed


def test_requests_run_uncompiled_while_the_step_compiles_in_the_background(
    loaded, monkeypatch, caplog
):
    release, compiling = threading.Event(), threading.Event()
    served_compiled = []

    def slow_compile(function, **options):  # a compile that takes until the test says
        def compiled(*arguments):
            if threading.current_thread().name == "baichuan2-compile":
                compiling.set()
                assert release.wait(60)
            else:
                served_compiled.append(arguments[0].shape[0])
            return function(*arguments)

        return compiled

    monkeypatch.setattr(torch, "compile", slow_compile)
    caplog.set_level(logging.INFO)
    ids = prompt(20)
    engine = NativeEngine(loaded, compile=False)
    try:
        expected = merge_chunks(engine.stream(ids, greedy(8))).token_ids
        engine.set_compile(True)
        with pytest.raises(TimeoutError):
            engine.warm_up(timeout=0.01)
        assert compiling.wait(60)
        during = merge_chunks(engine.stream(ids, greedy(8))).token_ids
        assert not engine._warm_up.ended.is_set()  # the compile has not ended yet
        assert served_compiled == [] and engine.slot_model.warmup_progress == (0, 4)
        release.set()
        seconds = engine.warm_up(timeout=60)
        after = merge_chunks(engine.stream(ids, greedy(8))).token_ids
    finally:
        release.set()
        engine.shutdown()
    assert during == expected and after == expected
    assert served_compiled and set(served_compiled) == {1}  # compiled once ready
    assert engine.slot_model.warmup_progress == (4, 4) and seconds > 0
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len([m for m in lines if m.startswith("Compiled the Baichuan2 decode step")]) == 4
    assert any(m.startswith("Warmed up the Baichuan2 decode step: 4 of 4") for m in lines)


def test_a_budget_of_one_full_context_row_runs_four_quarter_context_rows_at_once(
    loaded, monkeypatch
):
    engine = NativeEngine(loaded, compile=False)
    cache = engine.slot_model.cache
    engine.budget.set_bytes(CONTEXT * cache.position_bytes)
    widths = []
    original = SlotModel.decode

    def spy(self, slots, *args):
        widths.append(len(slots))
        return original(self, slots, *args)

    monkeypatch.setattr(SlotModel, "decode", spy)
    requests = [(prompt(100, start=3 + 50 * i), greedy(120)) for i in range(4)]  # 220 each
    try:
        engine.warm_up(timeout=60)
        assert (cache.rows, cache.length, cache.capacity) == (1, CONTEXT, CONTEXT)
        storage = cache._stores[0][0].data_ptr()
        alone = [merge_chunks(engine.stream(*r)).token_ids for r in requests]
        assert max(widths) == 1
        together = run_together(engine, requests)
    finally:
        engine.shutdown()
    assert [r.token_ids for r in together] == alone
    assert max(widths) == 4  # four rows of 256 in the storage of one row of 1024
    assert cache._stores[0][0].data_ptr() == storage and cache.capacity == CONTEXT


@torch.inference_mode()
def test_one_compiled_graph_serves_every_bucket_and_buffer_length(loaded):
    from torch._dynamo.utils import counters

    compiled, eager = SlotModel(loaded.model, compile=True), SlotModel(loaded.model)
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused
    before = counters["stats"]["unique_graphs"]
    prompts = [prompt(40, start=9 * i + 3) for i in range(4)]
    rows = {}
    for name, slot_model in (("c", compiled), ("e", eager)):
        slot_model.cache.reserve(4, 512)
        rows[name] = started_rows(slot_model, prompts)
    for length in (512, 1024):  # buffers reallocated at another length (and strides)
        for slot_model in (compiled, eager):
            slot_model.cache.reserve(4, length)
        # Row buckets 1, 2 and 4 (every taken row is in a step, as in the engine: a
        # bucket's other rows are written at position 0).
        for used in ([0], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3]):
            got = decode_step(compiled, [rows["c"][i] for i in used])
            expected = decode_step(eager, [rows["e"][i] for i in used])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert rows["c"] == rows["e"]
    assert not compiled.compile_failed
    # Three buckets over two buffer lengths: one graph for one row, one for several.
    assert compiled.compiled_classes == {(True, False, False), (False, False, False)}
    assert counters["stats"]["unique_graphs"] - before == 2
