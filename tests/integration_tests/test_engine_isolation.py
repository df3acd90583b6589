"""One request's numbers can only ever fail that request (fuzzed against normal ones)."""

import asyncio
import random

import pytest

from langchain_baichuan2 import ChatBaichuan2

EXTREMES = {
    "temperature": [1e-45, 1e-30, 1e-6, 0.7, 1e30, 0],
    "repetition_penalty": [1e-45, 1e-20, 1.0, 1e20, 1e45],
    "top_k": [0, 1, 3, 1800],
    "top_p": [1e-12, 0.3, 1.0],
    "seed": [None, 0, 2**63 - 1],
}


@pytest.fixture(scope="module")
def llm(tiny_7b):
    return ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=6)


def random_settings(rng):
    return {name: rng.choice(values) for name, values in EXTREMES.items()}


async def test_fuzzed_sampling_values_never_fail_a_normal_request(llm):
    expected = (await llm.ainvoke("hello")).content
    rng = random.Random(0)
    for _ in range(6):
        fuzzed = [random_settings(rng) for _ in range(6)]
        calls = [llm.ainvoke("hello") for _ in range(3)]
        calls += [llm.ainvoke("hello", **settings) for settings in fuzzed]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [r.content for r in results[:3]] == [expected] * 3, results[:3]
        for result, settings in zip(results[3:], fuzzed, strict=True):
            assert not isinstance(result, BaseException) or isinstance(result, ValueError), (
                settings,
                result,
            )


def test_an_overflowing_temperature_names_the_values(llm):
    # Seen tokens' positive logits divided by 1e-45 overflow to inf at any temperature.
    with pytest.raises(ValueError, match="temperature=0.7 with repetition_penalty=1e-45 overflows"):
        llm.invoke("hello", temperature=0.7, repetition_penalty=1e-45, top_k=0)
    assert llm.invoke("hello").content  # the engine serves the next call


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"top_k": 2**64}, "top_k must be at most the vocabulary size"),
        ({"seed": 2**70}, "seed must be an integer in"),
        ({"seed": -1}, "seed must be an integer in"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
    ],
)
def test_out_of_range_values_are_rejected_by_name(llm, settings, message):
    with pytest.raises(ValueError, match=message):
        llm.invoke("hello", **settings)


LONG = {"max_tokens": 2000, "model_kwargs": {"min_new_tokens": 2000}}


def test_a_call_past_its_timeout_raises_and_frees_its_row(tiny_7b):
    import time

    from langchain_baichuan2.engines.native import engine_for

    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, timeout=0.3, **LONG)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout=0.3"):
        llm.invoke("hello")
    assert time.monotonic() - start < 5
    engine = engine_for(llm.loaded_model())
    quick = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=3)
    assert quick.invoke("hello").usage_metadata["output_tokens"] >= 1  # the engine serves on
    time.sleep(0.2)
    assert engine._inbox.empty()


async def test_an_async_call_past_its_timeout_raises(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, **LONG)
    with pytest.raises(TimeoutError):
        await llm.ainvoke("hello", timeout=0.3)


def test_a_nonpositive_timeout_is_rejected(tiny_7b):
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ChatBaichuan2(model=str(tiny_7b), timeout=0)
