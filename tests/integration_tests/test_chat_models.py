"""ChatBaichuan2 end to end on tiny checkpoints, against independent truths."""

import asyncio
import threading
import time

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.native import NativeEngine, engine_for
from langchain_baichuan2.testing import make_tiny_checkpoint

from .tiny import picked_tokens

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return ChatBaichuan2(model=str(tiny_checkpoint), temperature=0, max_tokens=20)


def official_ids(loaded, text):
    """SPEC's single-turn prompt, written out: [195] + encode(text) + [196]."""
    return [195, *loaded.tokenizer.encode(text, add_special_tokens=False), 196]


def generate_directly(loaded, prompt_ids, max_new_tokens, repetition_penalty=1.05):
    """Greedy tokens from transformers' generate() on the same ids (stops at eos 2)."""
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            eos_token_id=2,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_invoke_equals_generate_on_the_official_prompt(llm):
    loaded = llm.loaded_model()
    expected_ids = generate_directly(loaded, official_ids(loaded, QUESTION), 20)
    expected_text = loaded.tokenizer.decode(
        [t for t in expected_ids if t != 2], skip_special_tokens=True
    )
    reply = llm.invoke(QUESTION)
    assert reply.content == expected_text
    assert reply.usage_metadata["input_tokens"] == len(official_ids(loaded, QUESTION))
    assert reply.usage_metadata["output_tokens"] == len(expected_ids)
    assert reply.usage_metadata["total_tokens"] == len(official_ids(loaded, QUESTION)) + len(
        expected_ids
    )
    finish = "stop" if expected_ids[-1] == 2 else "length"
    assert reply.response_metadata["finish_reason"] == finish


def test_stream_deltas_join_to_the_invoke_text(llm):
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Hi"),
        AIMessage("Hello"),
        HumanMessage(QUESTION),
    ]
    chunks = list(llm.stream(messages))
    text_chunks = [c for c in chunks if c.content]
    assert len(text_chunks) >= 2
    assert "".join(c.content for c in chunks) == llm.invoke(messages).content
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and chunks[-1].usage_metadata
    assert chunks[-1].response_metadata["model_name"] == llm.model


def test_every_delta_reaches_on_llm_new_token(llm):
    from langchain_core.callbacks import BaseCallbackHandler

    class Collect(BaseCallbackHandler):
        tokens: list[str] = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    handler = Collect()
    chunks = [c.content for c in llm.stream(QUESTION, config={"callbacks": [handler]}) if c.content]
    assert [t for t in handler.tokens if t] == chunks
    handler.tokens.clear()
    streaming = ChatBaichuan2(model=llm.model, temperature=0, max_tokens=20, streaming=True)
    assert streaming.invoke(QUESTION, config={"callbacks": [handler]}).content == "".join(chunks)
    assert [t for t in handler.tokens if t] == chunks


def test_checkpoint_defaults_apply_when_fields_are_unset(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b))
    params = llm._prepare([HumanMessage("hi")], None, {}).params
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (
        0.3,
        5,
        0.85,
        1.05,
    )
    assert params.max_new_tokens == 2048
    greedy = llm._prepare([HumanMessage("hi")], None, {"temperature": 0, "max_tokens": 7}).params
    assert greedy.temperature == 0 and greedy.max_new_tokens == 7


def test_sampling_with_a_seed_repeats(tiny_7b):
    llm = ChatBaichuan2(
        model=str(tiny_7b), temperature=1.5, top_k=50, top_p=0.95, seed=7, max_tokens=12
    )
    assert llm.invoke(QUESTION).content == llm.invoke(QUESTION).content


def test_stop_string_across_a_token_boundary_in_invoke_and_stream(llm):
    loaded = llm.loaded_model()
    free = llm.invoke(QUESTION)
    ids = generate_directly(loaded, official_ids(loaded, QUESTION), 20)
    ids = [t for t in ids if t != 2]
    pieces = [
        loaded.tokenizer.decode(ids[:n], skip_special_tokens=True) for n in range(len(ids) + 1)
    ]
    # A stop string made of the end of token k and the start of token k+1.
    k = next(
        n
        for n in range(2, len(ids) - 1)
        if len(pieces[n]) > len(pieces[n - 1])
        and len(pieces[n + 1]) > len(pieces[n])
        and pieces[n + 1].count(pieces[n][-1] + pieces[n + 1][len(pieces[n])]) == 1
    )
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    expected = free.content[: free.content.index(stop)]
    reply = llm.invoke(QUESTION, stop=[stop])
    assert reply.content == expected
    assert reply.response_metadata["finish_reason"] == "stop"
    streamed = list(llm.stream(QUESTION, stop=[stop]))
    assert "".join(c.content for c in streamed) == expected
    assert all(
        stop[0] not in c.content or c.content.index(stop[0]) < len(c.content) for c in streamed
    )
    constructed = ChatBaichuan2(model=llm.model, temperature=0, max_tokens=20, stop=[stop])
    assert constructed.invoke(QUESTION).content == expected


def test_batch_equals_one_by_one_and_runs_as_one_batch(llm, monkeypatch):
    prompts = ["Hi", "Tell me a long story about dragons and castles", "1 + 1 = ?", "你好"]
    alone = [llm.invoke(p).content for p in prompts]
    sizes = []
    original = NativeEngine._step

    def spy(self, batch):
        sizes.append(len(batch.rows))
        return original(self, batch)

    monkeypatch.setattr(NativeEngine, "_step", spy)
    together = [m.content for m in llm.batch(prompts)]
    assert together == alone
    assert sizes[0] == len(prompts)  # every prompt decodes from the first step on


def test_a_large_batch_starts_no_more_threads_than_rows_and_still_batches(tiny_7b, monkeypatch):
    # Before, batch(3000) started ~2,939 threads: one per input, all waiting on one batch.
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=2)
    rows_per_step = llm.engine().max_rows
    rows, threads = [], []
    original = NativeEngine._step

    def spy(self, batch):
        rows.append(len(batch.rows))
        threads.append(threading.active_count())
        return original(self, batch)

    monkeypatch.setattr(NativeEngine, "_step", spy)
    before = threading.active_count()
    replies = llm.batch([f"question {i}" for i in range(3 * rows_per_step)])
    assert len(replies) == 3 * rows_per_step and all(r.usage_metadata for r in replies)
    assert max(threads) - before <= rows_per_step + 4
    assert max(rows) >= rows_per_step // 2  # the rows still decode together


async def test_abatch_equals_one_by_one(llm):
    prompts = ["Hi", "Tell me a long story about dragons", "你好"]
    alone = [llm.invoke(p).content for p in prompts]
    assert [m.content for m in await llm.abatch(prompts)] == alone


def test_leaving_a_stream_early_cancels_and_the_next_call_works(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(
        model=str(tiny_7b), temperature=0, max_tokens=200, model_kwargs={"min_new_tokens": 200}
    )
    engine = engine_for(llm.loaded_model())
    steps = []
    embed = engine.model.model.embed_tokens
    original = embed.forward

    def counting_forward(*args, **kwargs):
        steps.append(time.perf_counter())
        return original(*args, **kwargs)

    monkeypatch.setattr(embed, "forward", counting_forward)
    stream = llm.stream(QUESTION)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    time.sleep(0.3)
    after_break = len(steps)
    time.sleep(0.3)
    assert len(steps) == after_break  # the worker stopped decoding
    assert after_break < 12
    monkeypatch.undo()
    assert (
        ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=5).invoke("hi").content
        is not None
    )


async def test_cancelling_an_astream_task_stops_generation(tiny_7b):
    llm = ChatBaichuan2(
        model=str(tiny_7b), temperature=0, max_tokens=300, model_kwargs={"min_new_tokens": 300}
    )
    received = []

    async def consume():
        async for chunk in llm.astream(QUESTION):
            received.append(chunk)

    task = asyncio.create_task(consume())
    while len(received) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    count = len(received)
    await asyncio.sleep(0.2)
    assert len(received) == count
    reply = await ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=4).ainvoke("hi")
    assert reply.usage_metadata["output_tokens"] >= 1


async def test_astream_does_not_block_the_event_loop(tiny_7b):
    llm = ChatBaichuan2(
        model=str(tiny_7b), temperature=0, max_tokens=60, model_kwargs={"min_new_tokens": 60}
    )
    await llm.ainvoke("warm up")
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0.001)

    tick_task = asyncio.create_task(ticker())
    chunks = [c async for c in llm.astream(QUESTION)]
    done = True
    await tick_task
    assert len(chunks) > 10
    assert ticks >= 10


def test_eight_threads_at_once_all_complete_and_match(llm):
    prompts = [f"Question number {i}: {'why ' * i}?" for i in range(8)]
    expected = [llm.invoke(p).content for p in prompts]
    results: dict[int, str] = {}

    def ask(i):
        results[i] = llm.invoke(prompts[i]).content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(8)] == expected


async def test_eight_async_tasks_at_once_all_complete_and_match(llm):
    prompts = [f"Async question {i}: {'how ' * i}?" for i in range(8)]
    expected = [llm.invoke(p).content for p in prompts]
    replies = await asyncio.gather(*(llm.ainvoke(p) for p in prompts))
    assert [r.content for r in replies] == expected


def test_an_error_in_the_generation_thread_reaches_the_caller(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=5)
    engine = engine_for(llm.loaded_model())

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    # The first module of every forward pass (the engine's own and the model's).
    monkeypatch.setattr(engine.model.model.embed_tokens, "forward", broken)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        llm.invoke("hi")
    monkeypatch.undo()
    assert llm.invoke("hi").usage_metadata["output_tokens"] >= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, r"temperature must be 0 \(greedy\) or >= 0.01"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"model_kwargs": {"num_beams": 4}}, "Unsupported generate"),
        ({"source": "ftp"}, "source"),
    ],
)
def test_bad_parameters_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChatBaichuan2(model="unused", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, r"temperature must be 0 \(greedy\) or >= 0.01"),
        ({"top_p": 2.0}, "top_p must be in"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": 4096}, "leaves no room for the prompt"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 2.7}, "top_k must be an integer"),
        ({"repetition_penalty": "x"}, "repetition_penalty must be a finite number"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"max_new_tokens": 5}, "Unknown call argument"),
        ({"stop": "ab"}, "stop must be a list of strings"),
        ({"top_k": 10**400}, "top_k must be at most the vocabulary size \\d+, got 1000"),
        ({"temperature": 10**400}, "temperature must be a finite number, got 1000"),
        ({"model_max_length": "abc"}, "model_max_length must be an integer >= 1, got 'abc'"),
        ({"model_kwargs": None}, None),
    ],
)
def test_bad_per_call_parameters_are_rejected_and_the_model_stays_usable(llm, kwargs, message):
    # Before: OverflowError, "invalid literal for int()", "'NoneType' object is not a mapping".
    if message is None:  # None is "not set", as for every other argument
        assert llm.invoke("hi", **kwargs).content is not None
    else:
        with pytest.raises((ValueError, TypeError), match=message):
            llm.invoke("hi", **kwargs)
    assert llm.invoke("hi").usage_metadata["input_tokens"] > 0


def test_bad_messages_are_rejected_and_the_model_stays_usable(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.invoke([])
    with pytest.raises(ValueError, match="image_url"):
        llm.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    assert llm.invoke("hi").usage_metadata["input_tokens"] > 0


def test_history_truncation_is_reported(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=8, model_max_length=60)
    history = []
    for i in range(6):
        history += [HumanMessage(f"turn {i} " + "words " * 5), AIMessage("ok " * 5)]
    reply = llm.invoke([*history, HumanMessage("last")])
    assert reply.response_metadata["dropped_rounds"] > 0
    assert reply.usage_metadata["input_tokens"] <= 60 - 8


def test_the_real_tokenizer_stream_never_splits_a_character(
    real_tokenizer_model, tmp_path_factory, monkeypatch
):
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("real-tok"), "13b", tokenizer_model=real_tokenizer_model
    )
    llm = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=64)
    tokenizer = llm.loaded_model().tokenizer
    text = "温故而知新，可以为师矣。🐉🧧 𠀀 naïve café"
    script = [*tokenizer.encode(text, add_special_tokens=False), 2]
    assert any(1089 <= t <= 1344 for t in script)  # byte-fallback pieces are in play
    position = {"next": 0}

    def scripted_pick(self, logits, rows, *args):
        token = script[position["next"]]
        position["next"] += 1
        return picked_tokens(token, len(rows))

    monkeypatch.setattr(NativeEngine, "_pick", scripted_pick)
    chunks = [c.content for c in llm.stream("你好")]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


def test_a_newest_round_over_the_budget_is_cut_by_the_official_rule(tiny_7b, caplog):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=8, model_max_length=48)
    loaded = llm.loaded_model()
    text = "a long question " * 20
    full = [195, *loaded.tokenizer.encode(text, add_special_tokens=False), 196]
    with caplog.at_level("WARNING"):
        reply = llm.invoke([SystemMessage("Be brief."), HumanMessage(text)])
    assert "cut on the left" in caplog.text
    assert reply.response_metadata["prompt_truncated"] is True
    # The official rule keeps the last model_max_length - max_tokens ids.
    assert reply.usage_metadata["input_tokens"] == 48 - 8 < len(full)
    expected = generate_directly(loaded, full[-(48 - 8) :], 8)
    assert reply.usage_metadata["output_tokens"] == len(expected)
    text_ids = [t for t in expected if t != 2]
    assert reply.content == loaded.tokenizer.decode(text_ids, skip_special_tokens=True)


@pytest.mark.parametrize("parse, user_tokens", [(False, 1), (True, 2)])
def test_typed_role_tokens_stay_text_unless_asked(tiny_7b, parse, user_tokens):
    llm = ChatBaichuan2(model=str(tiny_7b), max_tokens=4, parse_special_tokens=parse)
    call = llm._prepare([HumanMessage("<reserved_106>hi<reserved_107>")], None, {})
    assert call.prompt.input_ids.count(195) == user_tokens
    assert call.prompt.input_ids.count(196) == user_tokens


def test_embeddings_encode_typed_control_strings_as_text(tiny_7b):
    from langchain_baichuan2 import Baichuan2Embeddings
    from langchain_baichuan2.loading import registry

    embeddings = Baichuan2Embeddings(model=str(tiny_7b))
    loaded = registry.get(str(tiny_7b))
    (ids,) = embeddings._tokenize(loaded, ["<reserved_106></s>"])
    assert not {2, 195} & set(ids)
