"""Warming the compiled decode step up: every step class compiled once, in the background."""

import contextvars
import logging
import threading

import torch
from torch._dynamo.utils import counters

from langchain_baichuan2.engines.base import SamplingParams, merge_chunks
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint


def prompt(n, start=3):
    return [195, *(start + i % 900 for i in range(n - 2)), 196]


def greedy(new_tokens):
    return SamplingParams(
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        extra=(("min_new_tokens", new_tokens),),
    )


def answers(engine, groups):
    """Each group's token ids, its requests streamed concurrently from threads."""
    results = []
    for group in groups:
        got = {}

        def run(i, ids, got=got):
            got[i] = merge_chunks(engine.stream(ids, greedy(8))).token_ids

        with engine.gather(len(group)):
            threads = [
                threading.Thread(target=contextvars.copy_context().run, args=(run, i, ids))
                for i, ids in enumerate(group)
            ]
            for thread in threads:
                thread.start()
        for thread in threads:
            thread.join(120)
        results.append([got[i] for i in range(len(group))])
    return results


def test_after_warm_up_serving_compiles_nothing_and_the_buffers_never_grow(tmp_path, caplog):
    # Context 512 and 2 rows: buckets of 1 and 2 rows x 256 and 512 keys, 4 step classes.
    folder = make_tiny_checkpoint(tmp_path / "warm", "7b", model_max_length=512)
    engine = NativeEngine(load_model_and_tokenizer(folder), compile=False, max_rows=2)
    groups = [
        [prompt(12)],
        [prompt(400)],  # attends more than 256 keys
        [prompt(20, 40), prompt(30, 80)],
        [prompt(9, 120), prompt(300, 160), prompt(14, 200)],  # 3 requests, 2 rows
    ]
    slot_model = engine.slot_model
    try:
        expected = answers(engine, groups)  # uncompiled, buffers grown on demand
        engine.set_compile(True)
        torch._dynamo.reset()  # graphs of earlier tests with the same shapes would be reused
        before = counters["stats"]["unique_graphs"]
        with caplog.at_level(logging.INFO, logger="langchain_baichuan2.engines.native.slot_model"):
            seconds = engine.warm_up()
        assert seconds == slot_model.warmup_seconds and seconds > 0
        assert "Warmed up the Baichuan2 decode step" in caplog.text
        assert slot_model.warmup_progress == (4, 4)
        classes = {(rows, whole, False) for rows in (True, False) for whole in (True, False)}
        assert slot_model.compiled_classes == classes
        warmed_graphs = counters["stats"]["unique_graphs"]
        assert 3 <= warmed_graphs - before <= 4  # one row may share one graph
        shape = (slot_model.cache.generation, slot_model.cache.rows, slot_model.cache.length)
        assert shape[1:] == (2, 512)
        compile_seconds = slot_model.compile_seconds

        assert answers(engine, groups) == expected
    finally:
        engine.shutdown()
    assert not slot_model.compile_failed
    assert counters["stats"]["unique_graphs"] == warmed_graphs  # no compile while serving
    assert slot_model.compile_seconds == compile_seconds
    assert (slot_model.cache.generation, slot_model.cache.rows, slot_model.cache.length) == shape
