"""Prefix KV reuse and continuous batching give the same answers as running alone."""

import threading
import time

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.native import engine_for
from langchain_baichuan2.testing import make_tiny_checkpoint

SYSTEM = "You are a careful assistant who answers in short sentences. " * 3


def chat(folder, **kwargs):
    return ChatBaichuan2(model=str(folder), temperature=0, max_tokens=16, **kwargs)


@pytest.mark.parametrize(
    "follow_up",
    [
        # shares the whole first conversation, then goes on
        lambda first, answer: [*first, AIMessage(answer), HumanMessage("And then?")],
        # shares only the system prompt and the start of the first question
        lambda first, answer: [first[0], HumanMessage("Tell me about rivers instead")],
        # diverges inside the system prompt
        lambda first, answer: [SystemMessage(SYSTEM[:40] + " Be playful."), first[1]],
    ],
    ids=["full-history", "partial-prefix", "diverges-in-system"],
)
def test_reuse_on_and_off_give_identical_greedy_tokens(tiny_checkpoint, follow_up):
    first = [SystemMessage(SYSTEM), HumanMessage("Tell me about mountains")]
    without = chat(tiny_checkpoint, prefix_cache_tokens=0)
    engine = engine_for(without.loaded_model())
    answer = without.invoke(first).content
    expected = without.invoke(follow_up(first, answer))
    assert expected.usage_metadata["input_token_details"]["cache_read"] == 0

    with_reuse = chat(tiny_checkpoint, prefix_cache_tokens=4096)
    assert with_reuse.invoke(first).content == answer
    got = with_reuse.invoke(follow_up(first, answer))
    assert got.content == expected.content
    assert got.usage_metadata["input_token_details"]["cache_read"] > 0
    assert engine.prefix_cache.stored_tokens <= 4096


def test_reuse_counts_the_shared_prefix_exactly(tiny_7b):
    llm = chat(tiny_7b, prefix_cache_tokens=4096)
    loaded = llm.loaded_model()
    engine_for(loaded).prefix_cache.clear()
    tokenizer = loaded.tokenizer
    first = llm.invoke([SystemMessage(SYSTEM), HumanMessage("alpha")])
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    second = llm.invoke([SystemMessage(SYSTEM), HumanMessage("beta")])
    system_ids = tokenizer.encode(SYSTEM, add_special_tokens=False)
    # The prompts share the system ids and the user token 195.
    assert second.usage_metadata["input_token_details"]["cache_read"] == len(system_ids) + 1


def test_the_store_stays_within_a_small_budget(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "own", "7b")  # no other object shares it
    llm = chat(folder, prefix_cache_tokens=40)
    engine = engine_for(llm.loaded_model())
    for i in range(6):
        llm.invoke(f"question number {i} " * 3)
        assert engine.prefix_cache.stored_tokens <= 40


def test_an_object_without_reuse_neither_reads_nor_empties_the_shared_store(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "own", "7b")
    with_reuse = chat(folder, prefix_cache_tokens=4096)
    engine = engine_for(with_reuse.loaded_model())
    with_reuse.invoke("a question that will be asked twice")
    stored = engine.prefix_cache.stored_tokens
    without = chat(folder, prefix_cache_tokens=0)
    reply = without.invoke("a question that will be asked twice")
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 0
    assert engine.prefix_cache.stored_tokens == stored  # not emptied, not added to
    again = with_reuse.invoke("a question that will be asked twice")
    assert again.usage_metadata["input_token_details"]["cache_read"] > 0


def test_eight_concurrent_requests_each_equal_their_run_alone(tiny_7b):
    settings = [
        {"temperature": 0},
        {"temperature": 0, "stop": ["e"]},
        {"temperature": 0, "repetition_penalty": 1.3},
        {"temperature": 0, "max_tokens": 5},
        {"temperature": 0.9, "top_k": 20, "seed": 1},
        {"temperature": 1.2, "top_p": 0.8, "seed": 2},
        {"temperature": 0, "stop": ["a", "o"]},
        {"temperature": 0.7, "seed": 3, "stop": ["i"]},
    ]
    models = [
        ChatBaichuan2(model=str(tiny_7b), prefix_cache_tokens=0, **{"max_tokens": 24, **s})
        for s in settings
    ]
    prompts = [f"Prompt {i}: " + "more words " * i for i in range(8)]
    alone = [m.invoke(p).content for m, p in zip(models, prompts, strict=True)]
    results = {}

    def run(i):
        results[i] = models[i].invoke(prompts[i]).content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(8)] == alone


def test_a_new_request_joins_the_running_batch_and_a_cancelled_one_leaves_it(tiny_7b):
    long = ChatBaichuan2(
        model=str(tiny_7b), temperature=0, max_tokens=400, model_kwargs={"min_new_tokens": 400}
    )
    short = chat(tiny_7b)
    expected_short = short.invoke("short one").content
    events = []

    def run_long():
        for i, _ in enumerate(long.stream("a long answer please")):
            if i == 5:
                events.append("long running")
            if i == 60:  # leave early: cancels this request only
                break
        events.append("long cancelled")

    worker = threading.Thread(target=run_long)
    worker.start()
    while "long running" not in events:
        time.sleep(0.005)
    assert short.invoke("short one").content == expected_short
    events.append("short done")
    worker.join(timeout=120)
    # The short request finished while the long one was still decoding.
    assert events.index("short done") < events.index("long cancelled")
    assert short.invoke("short one").content == expected_short


def test_a_batch_with_limited_concurrency_does_not_wait_for_inputs_it_holds_back(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=4)
    prompts = [f"limited {i}" for i in range(6)]
    expected = [llm.invoke(p).content for p in prompts]
    start = time.perf_counter()
    got = [m.content for m in llm.batch(prompts, config={"max_concurrency": 2})]
    assert got == expected
    # Waiting for held-back inputs would cost GATHER_TIMEOUT (1 s) per wake-up.
    assert time.perf_counter() - start < 2.0


def test_clearing_the_registry_stops_the_engine_and_frees_the_model(tmp_path):
    import gc
    import weakref

    from langchain_baichuan2.loading import registry
    from langchain_baichuan2.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "ckpt", "7b")
    llm = chat(folder)
    llm.invoke("hi")
    loaded = llm.loaded_model()
    engine = engine_for(loaded)
    worker = engine._worker
    model = weakref.ref(loaded.model)
    del loaded, engine
    registry.clear()
    worker.join(timeout=10)
    assert not worker.is_alive()
    gc.collect()
    assert model() is None
    assert llm.invoke("hi").usage_metadata["output_tokens"] >= 1  # loads again on demand


def test_unload_frees_the_model_and_the_next_call_loads_it_again(tmp_path):
    from langchain_baichuan2.loading import load_settings, registry

    folder = make_tiny_checkpoint(tmp_path / "own", "7b")
    llm = chat(folder)
    first = llm.invoke("hi").content
    worker = engine_for(llm.loaded_model())._worker
    assert llm.unload() is True
    assert registry.peek(str(folder), **load_settings(llm)) is None
    worker.join(10)
    assert not worker.is_alive()
    assert llm.unload() is False
    assert llm.invoke("hi").content == first


def test_auto_dtype_and_the_dtype_it_resolves_to_share_one_model(tiny_7b):
    import torch

    from langchain_baichuan2.loading import resolve_dtype

    resolved = str(resolve_dtype("auto", on_gpu=torch.cuda.is_available())).removeprefix("torch.")
    auto = chat(tiny_7b, dtype="auto").loaded_model()
    assert chat(tiny_7b, dtype=resolved).loaded_model() is auto
