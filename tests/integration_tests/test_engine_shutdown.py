"""Every accepted request ends, answered or with an error, whenever the engine stops."""

import asyncio
import threading

import pytest

from langchain_baichuan2.engines.base import SamplingParams
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import load_model_and_tokenizer

LONG = SamplingParams(max_new_tokens=400, extra=(("min_new_tokens", 400),))


@pytest.fixture
def engine(tiny_7b):
    engine = NativeEngine(load_model_and_tokenizer(tiny_7b))
    yield engine
    engine.shutdown()


def consume(engine, outcomes, index):
    try:
        outcomes[index] = list(engine.stream([195, 40, 41, 196], LONG))[-1].finish_reason
    except RuntimeError as e:
        outcomes[index] = str(e)


def test_requests_queued_with_the_shutdown_marker_are_answered(engine):
    outcomes = {}
    threads = [threading.Thread(target=consume, args=(engine, outcomes, i)) for i in range(6)]
    for thread in threads:
        thread.start()
    engine.shutdown()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a caller was never answered"
    assert len(outcomes) == 6
    assert all(o in ("length", "The Baichuan2 engine was shut down") for o in outcomes.values())


def test_a_shutdown_that_times_out_still_stops_the_worker(engine):
    outcomes = {}
    thread = threading.Thread(target=consume, args=(engine, outcomes, 0))
    thread.start()
    while engine._worker is None or not engine._worker.is_alive():
        pass
    engine.shutdown(timeout=0)
    thread.join(30)
    engine._worker.join(30)
    assert not engine._worker.is_alive(), "the worker kept the model after shutdown"
    assert outcomes[0] in ("length", "The Baichuan2 engine was shut down")


async def test_async_callers_are_answered_at_shutdown(engine):
    async def consume_async():
        return [c async for c in engine.astream([195, 40, 41, 196], LONG)][-1].finish_reason

    tasks = [asyncio.create_task(consume_async()) for _ in range(4)]
    await asyncio.sleep(0.05)
    await asyncio.to_thread(engine.shutdown)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for result in results:
        assert result == "length" or "shut down" in str(result)


def test_no_request_is_accepted_after_shutdown(engine):
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        list(engine.stream([195, 40, 196], SamplingParams(max_new_tokens=2)))


def test_a_batch_that_ends_all_at_once_ends_without_an_error(engine, monkeypatch):
    import time

    from langchain_baichuan2.engines.native.batch import Request

    sent = []
    original = Request.send

    def record(self, item):
        sent.append(item)
        original(self, item)

    monkeypatch.setattr(Request, "send", record)
    list(engine.stream([195, 40, 41, 196], SamplingParams(max_new_tokens=3)))
    time.sleep(0.3)  # an error sent after the summary would arrive by now
    assert not [item for item in sent if isinstance(item, BaseException)]


async def test_a_worker_that_dies_unexpectedly_is_replaced(engine, monkeypatch):
    original = NativeEngine._take_waiting
    calls = []

    def flaky(self, block):
        calls.append(block)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return original(self, block)

    monkeypatch.setattr(NativeEngine, "_take_waiting", flaky)
    params = SamplingParams(max_new_tokens=2)
    chunks = await asyncio.wait_for(_collect(engine.astream([195, 40, 196], params)), 30)
    assert chunks[-1].finish_reason in ("stop", "length")


async def _collect(stream):
    return [chunk async for chunk in stream]
