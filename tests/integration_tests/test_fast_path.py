"""The native engine's fast path (slot KV cache, compiled step) against independent truths."""

import asyncio
import contextvars
import logging
import threading

import pytest
import torch

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.base import SamplingParams, merge_chunks
from langchain_baichuan2.engines.native import NativeEngine, engine_for
from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint


def full_forward_logits(model, ids):
    """Next-token logits of ``ids`` from one forward pass without any cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()


@pytest.fixture(scope="module", params=["7b", "13b"])
def model(request, tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(f"fast-{request.param}"), request.param)
    return load_model_and_tokenizer(folder).model


def test_rows_in_scattered_slots_decode_as_full_forward_passes(model):
    """Rows of different lengths, in slots 0 and 2 (slot 1 freed), grow past the buffer."""
    slots = SlotModel(model)
    prompts = [list(range(3, 3 + 250)), list(range(40, 40 + 17))]
    first, gap, third = (slots.cache.acquire(len(p) + 1) for p in (prompts[0], [1], prompts[1]))
    slots.cache.release(gap)
    rows = [(first, prompts[0]), (third, prompts[1])]
    with torch.no_grad():
        logits = [slots.prefill(slot, ids, 0)[0] for slot, ids in rows]
        for _ in range(12):  # crosses 256 positions: the buffers double mid-decode
            for (_, ids), got in zip(rows, logits, strict=True):
                expected = full_forward_logits(model, ids)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                ids.append(int(got.argmax()))
            lengths = [len(ids) - 1 for _, ids in rows]
            logits = slots.decode(
                [slot for slot, _ in rows],
                max(lengths) + 1,
                torch.tensor([slot for slot, _ in rows]),
                torch.tensor([ids[-1] for _, ids in rows]),
                torch.tensor(lengths),
            )
    assert slots.cache.length == 512


def test_a_stored_prefix_written_into_a_slot_continues_as_a_full_forward_pass(model):
    source, target = SlotModel(model), SlotModel(model)
    ids = list(range(5, 60))
    with torch.no_grad():
        slot = source.cache.acquire(len(ids))
        source.prefill(slot, ids, 0)
        reused = 30
        other = target.cache.acquire(len(ids))
        target.write(
            other,
            [
                (k[:, :, :reused].clone(), v[:, :, :reused].clone())
                for k, v in source.read(slot, len(ids))
            ],
        )
        got = target.prefill(other, ids[reused:], reused)[0]
    torch.testing.assert_close(got, full_forward_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_compiled_step_gives_the_uncompiled_text_and_reports_its_compile_time(tmp_path, caplog):
    folder = make_tiny_checkpoint(tmp_path / "compiled", "13b")
    settings = {"model": str(folder), "temperature": 0, "max_tokens": 12, "prefix_cache_tokens": 0}
    prompts = ["first question", "a second, longer question about the sea"]
    eager = ChatBaichuan2(**settings, compile=False)
    expected = [eager.invoke(p).content for p in prompts]
    compiled = ChatBaichuan2(**settings, compile=True)
    with caplog.at_level(logging.INFO, logger="langchain_baichuan2.engines.native.slot_model"):
        assert [compiled.invoke(p).content for p in prompts] == expected
        assert [m.content for m in compiled.batch(prompts)] == expected
    slot_model = engine_for(compiled.loaded_model()).slot_model
    assert slot_model.compile and not slot_model.compile_failed
    assert slot_model.compile_seconds > 0
    assert "Compiled the Baichuan2 decode step" in caplog.text


def test_a_compiler_that_fails_falls_back_to_the_same_text(tmp_path, monkeypatch, caplog):
    folder = make_tiny_checkpoint(tmp_path / "no-compiler", "7b")
    llm = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=10, compile=False)
    expected = llm.invoke("hello there").content

    def broken_compile(*args, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("no C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        again = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=10, compile=True)
        assert again.invoke("hello there").content == expected
    assert "no C++ compiler found" in caplog.text
    assert engine_for(again.loaded_model()).slot_model.compile_failed
    assert again.invoke("hello there").content == expected


def test_quantized_weights_run_uncompiled(tiny_13b):
    llm = ChatBaichuan2(
        model=str(tiny_13b), quantization="8bit", temperature=0, max_tokens=6, compile=True
    )
    assert llm.invoke("hi").usage_metadata["output_tokens"] >= 1
    assert engine_for(llm.loaded_model()).slot_model.compile is False


def test_cpu_fp32_weights_are_relaid_out_without_changing_values(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "layout", "7b")
    model = load_model_and_tokenizer(folder).model
    before = {name: p.clone() for name, p in model.named_parameters()}
    ids = list(range(3, 40))
    expected = full_forward_logits(model, ids)
    with torch.no_grad():
        SlotModel(model).prefill(0, ids, 0)
    for weight in (model.model.layers[0].self_attn.W_pack.weight, model.lm_head.weight):
        assert not weight.is_contiguous() and weight.t().is_contiguous()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    torch.testing.assert_close(full_forward_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_constrained_row_beside_a_free_row_follows_its_grammar(tmp_path):
    """Per-row grammar masks land on their own row whatever the batch's logits layout."""
    folder = make_tiny_checkpoint(tmp_path / "mixed", "7b")
    schema = {
        "title": "Trip",
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }
    llm = ChatBaichuan2(
        model=str(folder), temperature=0, max_tokens=60, prefix_cache_tokens=0, repetition_penalty=1
    )
    structured = llm.with_structured_output(schema, method="json_schema")
    alone = structured.invoke("plan a trip")
    free = ChatBaichuan2(
        model=str(folder),
        temperature=0,
        max_tokens=60,
        repetition_penalty=1,  # no penalty: the logits reach the mask as the head left them
        model_kwargs={"min_new_tokens": 60},
    )

    async def together():
        return await asyncio.gather(structured.ainvoke("plan a trip"), free.ainvoke("chat"))

    engine = engine_for(llm.loaded_model())
    with engine.gather(2):
        result, _ = asyncio.run(together())
    assert result == alone
    assert set(result) == {"city", "days"}


def test_running_out_of_memory_while_growing_leaves_the_cache_usable(model, monkeypatch):
    slots = SlotModel(model)
    with torch.no_grad():
        slots.prefill(slots.acquire(20), list(range(3, 23)), 0)
    shapes = [tuple(k.shape) for k in slots.cache.keys]
    allocations = {"n": 0}
    original = slots.cache._empty

    def failing(*args):
        allocations["n"] += 1
        if allocations["n"] == 3:
            raise torch.OutOfMemoryError("simulated")
        return original(*args)

    monkeypatch.setattr(slots.cache, "_empty", failing)
    with pytest.raises(torch.OutOfMemoryError):
        slots.cache.reserve(1, 600)
    assert [tuple(k.shape) for k in slots.cache.keys] == shapes
    assert slots.cache.length == shapes[0][2]
    monkeypatch.undo()
    ids = list(range(3, 300))
    with torch.no_grad():
        got = slots.prefill(0, ids, 0)[0]
    torch.testing.assert_close(got, full_forward_logits(model, ids), rtol=1e-4, atol=1e-4)


def _prompt(n, start=3):
    return [195, *(start + i % 900 for i in range(n - 2)), 196]


def _greedy(new_tokens):
    return SamplingParams(
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        extra=(("min_new_tokens", new_tokens),),
    )


def test_after_a_long_request_the_compiled_step_attends_few_keys_again(tmp_path, monkeypatch):
    folder = make_tiny_checkpoint(tmp_path / "key-buckets", "7b")
    engine = NativeEngine(load_model_and_tokenizer(folder), compile=False)
    requests = [_prompt(600), _prompt(12)]
    try:
        expected = [merge_chunks(engine.stream(ids, _greedy(8))).token_ids for ids in requests]
        engine.set_compile(True)
        shapes = []
        slot_model = engine.slot_model
        original = slot_model._run_compiled

        def spy(*arguments):
            shapes.append((arguments[0].shape[0], arguments[2][0].shape[2]))
            return original(*arguments)

        monkeypatch.setattr(slot_model, "_run_compiled", spy)
        got = []
        for ids in requests:
            shapes.append("request")
            got.append(merge_chunks(engine.stream(ids, _greedy(8))).token_ids)
    finally:
        engine.shutdown()
    assert got == expected
    assert not slot_model.compile_failed
    split = shapes.index("request", 1)
    assert set(shapes[1:split]) == {(1, 1024)}  # 600 positions and more, buffers of 1024
    assert set(shapes[split + 1 :]) == {(1, 256)}  # the short request reads 256 keys


def test_when_rows_end_the_remaining_row_moves_down_and_decodes_as_before(tiny_7b, monkeypatch):
    loaded = load_model_and_tokenizer(tiny_7b)
    engine = NativeEngine(loaded)
    calls = []
    original = SlotModel.decode

    def spy(self, slots, *args):
        calls.append(list(slots))
        return original(self, slots, *args)

    monkeypatch.setattr(SlotModel, "decode", spy)
    first_chunk = threading.Event()

    def short(i):
        for _ in engine.stream(_prompt(10 + i, start=20 * i + 3), _greedy(30)):
            first_chunk.set()

    long_ids = _prompt(25, start=500)
    try:
        with engine.gather(3):
            threads = [
                threading.Thread(target=contextvars.copy_context().run, args=(short, i))
                for i in range(3)
            ]
            for thread in threads:
                thread.start()
        assert first_chunk.wait(60)
        got = merge_chunks(engine.stream(long_ids, _greedy(60))).token_ids  # joins in slot 3
        for thread in threads:
            thread.join(60)
    finally:
        engine.shutdown()
    assert [0, 1, 2, 3] in [sorted(c) for c in calls]
    assert calls[-1] == [0]  # alone: its keys moved to slot 0, the step covers one row
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([long_ids]),
            max_new_tokens=60,
            min_new_tokens=60,
            do_sample=False,
            repetition_penalty=1.0,
            pad_token_id=0,
        )
    assert got == out[0, len(long_ids) :].tolist()
