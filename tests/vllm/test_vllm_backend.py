"""ChatBaichuan2(backend="vllm") against the native backend on the same checkpoint.

The native backend is the independent truth here: it is tested against transformers'
``generate()`` and the official prompt elsewhere. Greedy decoding in fp32 must give
the same text, token counts and finish reasons on both.
"""

import asyncio
import time

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field

from langchain_baichuan2 import ChatBaichuan2
from tests.vllm.conftest import VLLM_KWARGS, chat_models

CONVERSATIONS = {
    "single turn": [HumanMessage("What is the capital of France?")],
    "system and chinese": [SystemMessage("你是助手。"), HumanMessage("解释一下温故而知新")],
    "multi-turn with tools": [
        SystemMessage("Use tools when they help."),
        HumanMessage("What's the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("sunny, 21 C", tool_call_id="c1", name="weather"),
        AIMessage("It is sunny in Paris."),
        HumanMessage("And tomorrow?"),
    ],
    "continues an assistant turn": [HumanMessage("Count to five."), AIMessage("1, 2,")],
}


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the name")
    age: int


def same_reply(a, b):
    assert a.content == b.content
    assert a.usage_metadata["input_tokens"] == b.usage_metadata["input_tokens"]
    assert a.usage_metadata["output_tokens"] == b.usage_metadata["output_tokens"]
    assert a.response_metadata["finish_reason"] == b.response_metadata["finish_reason"]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_greedy_text_equals_the_native_backend(pair, name):
    native, vllm = pair
    same_reply(vllm.invoke(CONVERSATIONS[name]), native.invoke(CONVERSATIONS[name]))


def test_a_reply_ended_by_eos_counts_it_like_the_native_backend(pair):
    native, vllm = pair
    # Forbid nothing, but allow long answers: some prompts end with eos on random weights.
    prompts = [f"Say something about {n}." for n in range(6)]
    for prompt in prompts:
        same_reply(vllm.invoke(prompt, max_tokens=64), native.invoke(prompt, max_tokens=64))


def test_stream_chunks_join_to_the_invoke_text(pair):
    _, vllm = pair
    messages = CONVERSATIONS["multi-turn with tools"]
    chunks = list(vllm.stream(messages))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == vllm.invoke(messages).content
    assert chunks[-1].usage_metadata["output_tokens"] == 24


def test_stop_strings_end_the_answer_as_on_the_native_backend(pair):
    native, vllm = pair
    text = native.invoke("Tell me a story.").content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = native.invoke("Tell me a story.", stop=[stop])
    assert expected.content == text[: text.index(stop)]
    same_reply(vllm.invoke("Tell me a story.", stop=[stop]), expected)
    assert "".join(c.text for c in vllm.stream("Tell me a story.", stop=[stop])) == expected.content


async def test_async_invoke_stream_and_batch(pair):
    native, vllm = pair
    prompts = ["Hello!", "你好", "What is 1 + 1?"]
    expected = [native.invoke(p).content for p in prompts]
    assert (await vllm.ainvoke(prompts[0])).content == expected[0]
    assert "".join([c.text async for c in vllm.astream(prompts[1])]) == expected[1]
    assert [r.content for r in await vllm.abatch(prompts)] == expected
    assert [r.content for r in vllm.batch(prompts)] == expected


def test_sampling_with_a_seed_repeats(pair):
    _, vllm = pair
    settings = {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}
    first = vllm.invoke("Tell me a story.", seed=7, **settings).content
    assert vllm.invoke("Tell me a story.", seed=7, **settings).content == first


def test_tool_choice_any_gives_a_parsed_call(pair):
    native, vllm = pair

    def call(llm):
        bound = llm.bind_tools([Person], tool_choice="any").bind(max_tokens=200)
        return bound.invoke("Who is the oldest person you know?")

    reply = call(vllm.model_copy(update={"grammar_max_length": 6}))
    assert [c["name"] for c in reply.tool_calls] == ["Person"]
    assert Person.model_validate(reply.tool_calls[0]["args"])
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    expected = call(native.model_copy(update={"grammar_max_length": 6}))
    assert reply.tool_calls[0]["args"] == expected.tool_calls[0]["args"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_parsed(pair, method):
    native, vllm = pair
    bounded = {"grammar_max_length": 6, "max_tokens": 200}
    result = (
        vllm.model_copy(update=bounded)
        .with_structured_output(Person, method=method)
        .invoke("Describe someone.")
    )
    assert isinstance(result, Person)
    expected = (
        native.model_copy(update=bounded)
        .with_structured_output(Person, method=method)
        .invoke("Describe someone.")
    )
    assert result == expected


def wait_until_idle(engine, seconds=5.0):
    deadline = time.monotonic() + seconds
    while engine.running_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.running_requests()


def test_closing_a_stream_aborts_the_vllm_request(pair):
    _, vllm = pair
    engine = vllm.engine()
    stream = vllm.stream("Tell me a very long story.", max_tokens=1500)
    next(stream)
    assert engine.running_requests() == 1
    stream.close()
    assert wait_until_idle(engine) == 0


async def test_cancelling_a_task_aborts_the_vllm_request(pair):
    _, vllm = pair
    engine = vllm.engine()
    started = asyncio.Event()

    async def consume():
        async for _ in vllm.astream("Tell me a very long story.", max_tokens=1500):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(wait_until_idle, engine) == 0


def test_prefix_cache_reads_are_reported_as_cache_read(pair):
    native, vllm = pair
    history = [HumanMessage("长" * 600), AIMessage("好的"), HumanMessage("继续")]
    vllm.invoke(history)
    again = vllm.invoke(history)
    assert again.usage_metadata["input_token_details"]["cache_read"] > 0
    assert again.content == native.invoke(history).content
    uncached = vllm.model_copy(update={"prefix_cache_tokens": 0}).invoke(history)
    assert uncached.usage_metadata["input_token_details"]["cache_read"] == 0
    vllm.engine().set_prefix_cache_tokens(vllm.prefix_cache_tokens)


def test_settings_vllm_cannot_honour_are_rejected(vllm_folders):
    folder = str(vllm_folders["7b"])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        ChatBaichuan2(model=folder, backend="vllm", model_kwargs={"no_repeat_ngram_size": 3})
    with pytest.raises(ValueError, match="quantization"):
        ChatBaichuan2(model=folder, backend="vllm", quantization="4bit")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ChatBaichuan2(model=folder, backend="native", tensor_parallel_size=2)


def test_min_new_tokens_is_honoured(pair):
    native, vllm = pair
    settings = {"model_kwargs": {"min_new_tokens": 20}}
    a = vllm.model_copy(update=settings).invoke("Hi", max_tokens=20)
    b = native.model_copy(update=settings).invoke("Hi", max_tokens=20)
    same_reply(a, b)
    assert a.usage_metadata["output_tokens"] == 20


@pytest.mark.slow
@pytest.mark.parametrize(
    "split, checkpoint",
    [
        ("tensor_parallel_size", "13b-tp"),  # each layer's 6 ALiBi heads split 3 + 3
        ("pipeline_parallel_size", "7b"),  # 2 layers: one per stage
    ],
)
def test_two_way_parallel_gives_the_same_tokens(
    vllm_folders, cpu_threads_for_two_ranks, split, checkpoint
):
    folder = vllm_folders[checkpoint]
    native, _ = chat_models(folder)
    parallel = ChatBaichuan2(
        model=str(folder),
        backend="vllm",
        vllm_kwargs=VLLM_KWARGS,
        temperature=0,
        max_tokens=24,
        dtype="float32",
        **{split: 2},
    )
    for messages in CONVERSATIONS.values():
        same_reply(parallel.invoke(messages), native.invoke(messages))
    if split == "pipeline_parallel_size":
        parallel.unload()  # frees its two workers (the README test reuses the TP engine)


@pytest.mark.slow
def test_vllm_offline_llm_loads_the_folder_and_matches_transformers_generate(vllm_folders):
    import torch
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt

    from langchain_baichuan2.loading import load_model_and_tokenizer

    folder = vllm_folders["13b"]
    prompt = [195, 300, 301, 302, 303, 196]
    loaded = load_model_and_tokenizer(folder, dtype="float32")
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2
        )
    expected = out[0, len(prompt) :].tolist()
    llm = LLM(str(folder), dtype="float32", **VLLM_KWARGS)
    try:
        (result,) = llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)],
            VllmSamplingParams(temperature=0, max_tokens=12),
            use_tqdm=False,
        )
        assert list(result.outputs[0].token_ids) == expected
    finally:
        llm.llm_engine.engine_core.shutdown()


async def test_a_call_past_its_timeout_raises_and_aborts_the_vllm_request(pair):
    _, vllm = pair
    long = {"max_tokens": 1500, "model_kwargs": {"min_new_tokens": 1500}, "timeout": 0.5}
    with pytest.raises(TimeoutError, match="timeout=0.5"):
        vllm.invoke("Tell me a very long story.", **long)
    assert wait_until_idle(vllm.engine()) == 0
    with pytest.raises(TimeoutError):
        await vllm.ainvoke("Tell me a very long story.", **long)
    assert await asyncio.to_thread(wait_until_idle, vllm.engine()) == 0
    assert vllm.invoke("Hello!").content  # the engine serves the next call


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": 1e-45}, "temperature must be 0 (greedy) or >= 0.01, got 1e-45"),
        ({"model_kwargs": {"min_new_tokens": -5}}, "min_new_tokens must be an integer >= 0"),
        (
            {"max_tokens": 4, "model_kwargs": {"min_new_tokens": 5}},
            "min_new_tokens (5) must not exceed max_tokens (4)",
        ),
    ],
)
def test_values_vllm_would_clamp_or_reword_raise_the_native_error(pair, settings, message):
    # vLLM alone would raise 0.01 to the temperature and word its own min_tokens errors.
    native, vllm = pair
    errors = []
    for llm in (native, vllm):
        with pytest.raises(ValueError) as raised:
            llm.model_copy(update=settings).invoke("Hi")
        errors.append(str(raised.value))
    assert errors[0] == errors[1]
    assert message in errors[1]
    assert vllm.invoke("Hi").content == native.invoke("Hi").content  # still serving


def test_a_temperature_above_vllms_limit_is_a_clear_value_error(pair):
    native, vllm = pair
    assert native.invoke("Hi", temperature=3.0).content  # the native engine samples it
    with pytest.raises(ValueError, match=r"temperature must be at most 2.0 on backend 'vllm'"):
        vllm.invoke("Hi", temperature=3.0)
    assert vllm.invoke("Hi").content == native.invoke("Hi").content
