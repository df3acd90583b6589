"""Loading, engine start and unload form one lifecycle: racing them leaves nothing behind."""

import threading
import time

import pytest
from pydantic import BaseModel

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines import native
from langchain_baichuan2.errors import EngineStoppedError, ModelUnloadedError
from langchain_baichuan2.loading import registry


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "baichuan2-engine" and t.is_alive()]


def test_unload_racing_with_callers_leaves_no_stray_engine(tiny_7b):
    registry.clear()
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=2, max_retries=0)
    stop = threading.Event()
    failures: list[BaseException] = []
    answered: list[int] = []

    def call() -> None:
        while not stop.is_set():
            try:
                llm.invoke("hi")
                answered.append(1)
            except EngineStoppedError:
                answered.append(0)  # unloaded under this call: a clear error is allowed
            except BaseException as e:  # anything else is a bug
                failures.append(e)
                return

    callers = [threading.Thread(target=call) for _ in range(3)]
    for caller in callers:
        caller.start()
    try:
        for _ in range(100):
            time.sleep(0.03)  # let callers load the model and start engines meanwhile
            llm.unload()
    finally:
        stop.set()
        for caller in callers:
            caller.join(60)
    assert not failures, failures
    assert len(answered) >= 10  # the callers really ran between the unloads
    llm.unload()
    for thread in engine_threads():
        thread.join(10)
    assert engine_threads() == []


def test_no_engine_starts_on_a_model_unloaded_after_its_lookup(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b))
    loaded = llm.loaded_model()
    llm.unload()  # the window a concurrent caller hits between lookup and engine start
    with pytest.raises(ModelUnloadedError, match="was unloaded"):
        native.engine_for(loaded)
    assert engine_threads() == []
    assert llm.engine().loaded is not loaded  # a call loads it again


def test_a_call_whose_engine_is_unloaded_before_it_starts_is_retried(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=3)
    expected = llm.invoke("hello").content
    engine = llm.engine()
    real_stream = type(engine).stream
    calls = []

    def unload_then_stream(self, prompt_ids, params):
        calls.append(self)
        if len(calls) == 1:
            llm.unload()  # the engine this call holds is shut down before it submits
        return real_stream(self, prompt_ids, params)

    monkeypatch.setattr(type(engine), "stream", unload_then_stream)
    assert llm.invoke("hello").content == expected
    assert len(calls) == 2 and calls[0] is not calls[1]


def test_without_retries_the_stopped_engine_is_a_clear_error(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=3, max_retries=0)
    engine = llm.engine()
    real_stream = type(engine).stream

    def unload_then_stream(self, prompt_ids, params):
        llm.unload()
        return real_stream(self, prompt_ids, params)

    monkeypatch.setattr(type(engine), "stream", unload_then_stream)
    try:
        llm.invoke("hello")
    except EngineStoppedError as e:
        assert "shut down" in str(e)
    else:
        raise AssertionError("expected EngineStoppedError")
    monkeypatch.undo()
    assert llm.invoke("hello").content  # the next call loads the model again


async def test_an_async_call_whose_engine_is_unloaded_before_it_starts_is_retried(
    tiny_7b, monkeypatch
):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=3)
    expected = (await llm.ainvoke("hello")).content
    engine = llm.engine()
    real_astream = type(engine).astream
    calls = []

    def unload_then_astream(self, prompt_ids, params):
        calls.append(self)
        if len(calls) == 1:
            llm.unload()
        return real_astream(self, prompt_ids, params)

    monkeypatch.setattr(type(engine), "astream", unload_then_astream)
    assert (await llm.ainvoke("hello")).content == expected
    assert len(calls) == 2 and calls[0] is not calls[1]


class City(BaseModel):
    """A city."""

    name: str


@pytest.mark.parametrize(
    "bind",
    [
        lambda llm: llm.bind_tools([City], tool_choice="any"),
        lambda llm: llm.with_structured_output(City, include_raw=True),
    ],
    ids=["tool call", "structured output"],
)
def test_a_constrained_call_racing_unload_is_retried_like_a_plain_one(tiny_7b, monkeypatch, bind):
    # The grammar compiler is fetched from the loaded model: a closed one raised
    # ModelUnloadedError, which was not retried while a plain call was.
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=8, grammar_max_length=4)
    runnable = bind(llm)
    engine = llm.engine()
    real_stream = type(engine).stream
    calls = []

    def unload_then_stream(self, prompt_ids, params):
        calls.append(self)
        if len(calls) == 1:
            llm.unload()
        return real_stream(self, prompt_ids, params)

    monkeypatch.setattr(type(engine), "stream", unload_then_stream)
    runnable.invoke("Which city?")  # answers, never ModelUnloadedError
    assert len(calls) == 2 and calls[0] is not calls[1]


def test_the_timeout_is_the_whole_calls_across_retries(tiny_7b, monkeypatch):
    # Before, each retry got the full timeout: 2.0 s ended after 3.7 s across two tries.
    llm = ChatBaichuan2(
        model=str(tiny_7b),
        temperature=0,
        max_tokens=400,
        model_kwargs={"min_new_tokens": 400},
        timeout=1.5,
    )
    engine = llm.engine()
    real_stream = type(engine).stream
    timeouts = []

    def stop_late_then_stream(self, prompt_ids, params):
        timeouts.append(params.timeout)
        if len(timeouts) == 1:
            time.sleep(0.8)
            raise EngineStoppedError("The engine stopped (simulated)")
        return real_stream(self, prompt_ids, params)

    embed = engine.model.model.embed_tokens
    forward = embed.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)  # 400 tokens take 8 s: only the timeout ends the call
        return forward(*args, **kwargs)

    monkeypatch.setattr(type(engine), "stream", stop_late_then_stream)
    monkeypatch.setattr(embed, "forward", slow_forward)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout=1.5 s"):
        llm.invoke("hello")
    elapsed = time.monotonic() - started
    assert timeouts[0] <= 1.5 and timeouts[1] <= 1.5 - 0.8  # what is left of the call
    assert elapsed < 2.1  # one limit for the whole call, not 0.8 + 1.5 s
