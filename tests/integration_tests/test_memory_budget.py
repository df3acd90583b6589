"""The one memory budget: what is set aside on a GPU, and running out of memory (simulated)."""

from types import SimpleNamespace

import pytest
import torch

from langchain_baichuan2 import Baichuan2Embeddings, embeddings
from langchain_baichuan2.engines.base import merge_chunks
from langchain_baichuan2.engines.native import NativeEngine, budget
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.prefix_cache import PrefixCache

from .test_admission import generated, params, prompt
from .tiny import run_together

GIB = 2**30
# Baichuan2-7B's shape.
SEVEN_B = SimpleNamespace(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_hidden_layers=32,
    position_embedding="rope",
    vocab_size=125696,
)


@pytest.fixture
def loaded(tiny_7b):
    return load_model_and_tokenizer(tiny_7b)


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_the_default_budget_on_a_gpu_sets_aside_every_other_use(monkeypatch):
    # 40 GiB free on the device plus 1 GiB of torch's cached free blocks.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * GIB)
    devices = [torch.device("cuda", 0)] * 32
    position_bytes = 2 * 32 * 4096 * 2  # keys and values of 32 bf16 layers
    kv = budget.default_kv_cache_bytes(
        devices, position_bytes, SEVEN_B, 4096, rows=64, prefill_tokens=512
    )
    # By hand: a 512-token prefill (bool mask 8 x 512 x 4096, activations of
    # 6 x 4096 + 3 x 11008 per token in bf16, 512 MiB slack) ...
    prefill = 2**29 + 8 * 512 * 4096 + 512 * 57600 * 2
    # ... ten fp32 [64, 125696] step temporaries ...
    temporaries = 10 * 64 * 125696 * 4
    # ... the graph pool: twice a 64-row step's activations and attention, plus 256 MiB ...
    graphs = 2**28 + 2 * (64 * 57600 * 2 + 64 * 32 * 4096 * 6)
    # ... and an 8,192-token embedding forward with its 4096 x 4096 mask.
    embedding = 8192 * 57600 * 2 + 8192 * 4096 * 10 + 8 * 4096 * 4096
    assert (prefill, temporaries, graphs, embedding) == (
        612630528,
        321781760,
        383844352,
        1413480448,
    )
    set_aside = temporaries + graphs + max(prefill, embedding)  # never both forwards at once
    expected_positions = int(0.95 * 41 * GIB - set_aside) // position_bytes
    assert expected_positions == 75727
    assert kv == 75727 * position_bytes
    reserved = budget.Reservations.of(SEVEN_B, 4096, 64, 512, 2)
    assert reserved.total == set_aside


def test_whole_prompt_prefills_set_aside_their_larger_workspace_on_alibi():
    shape = {"hidden_size": 5120, "intermediate_size": 13696, "num_attention_heads": 40}
    thirteen_b = SimpleNamespace(**{**vars(SEVEN_B), **shape, "position_embedding": "alibi"})
    whole = budget.prefill_workspace_bytes(thirteen_b, 4096, 4096)
    chunk = budget.prefill_workspace_bytes(thirteen_b, 512, 4096)
    assert whole - chunk == 8 * 40 * (4096 - 512) * 4096 + (4096 - 512) * (6 * 5120 + 3 * 13696) * 2


def test_a_decode_step_out_of_memory_fails_only_the_newest_row(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    slot_model = type(engine.slot_model)
    original_decode, original_prefill = slot_model.decode, slot_model.prefill
    order = []

    def prefill(self, slot, ids, start, *rest):
        order.append(len(ids) + start)
        return original_prefill(self, slot, ids, start, *rest)

    def decode(self, slots, *rest):
        if len(slots) == 3:  # three rows never fit
            out_of_memory()
        return original_decode(self, slots, *rest)

    monkeypatch.setattr(slot_model, "prefill", prefill)
    monkeypatch.setattr(slot_model, "decode", decode)
    requests = [(prompt(n), params(30, forced=30)) for n in (20, 26, 33)]
    try:
        results = run_together(engine, requests)
        assert engine.slot_model.cache.used == 0  # every slot freed, the failed one's too
    finally:
        engine.shutdown()
    newest = order[-1]  # the prompt length of the last row to join
    for (ids, _), result in zip(requests, results, strict=True):
        if len(ids) == newest:
            assert isinstance(result, torch.OutOfMemoryError)
            assert "decode step of 3 rows" in str(result)
            assert "the newest, was stopped after 1 tokens so the other 2 go on" in str(result)
        else:
            assert result.token_ids == generated(loaded, ids, 30, forced=30)


def test_out_of_memory_with_stored_prefixes_evicts_them_and_the_request_succeeds(
    loaded, monkeypatch
):
    engine = NativeEngine(loaded)
    engine.set_prefix_cache_tokens(1000)
    stored = prompt(40, start=500)
    slot_model = type(engine.slot_model)
    original = slot_model.prefill
    failures = []

    def prefill(self, slot, ids, start, *rest):
        if engine.prefix_cache.stored_tokens:  # no memory while anything is stored
            failures.append(len(ids))
            out_of_memory()
        return original(self, slot, ids, start, *rest)

    try:
        merge_chunks(engine.stream(stored, params(2, forced=2)))
        [entry] = engine.prefix_cache.entries()
        assert entry[:40] == tuple(stored)
        monkeypatch.setattr(slot_model, "prefill", prefill)
        ids = prompt(30)
        reply = merge_chunks(engine.stream(ids, params(10, forced=10)))
    finally:
        engine.shutdown()
    assert failures == [29]  # once (its first id came from the store), then emptied, it ran
    assert entry not in engine.prefix_cache.entries()
    assert reply.token_ids == generated(loaded, ids, 10, forced=10)


def test_a_decode_step_out_of_memory_with_stored_prefixes_fails_no_row(loaded, monkeypatch):
    engine = NativeEngine(loaded)
    engine.set_prefix_cache_tokens(1000)
    slot_model = type(engine.slot_model)
    original = slot_model.decode
    failures = []

    def decode(self, slots, *rest):
        if engine.prefix_cache.stored_tokens and len(slots) == 2:
            failures.append(len(slots))
            out_of_memory()
        return original(self, slots, *rest)

    requests = [(prompt(n), params(20, forced=20)) for n in (20, 33)]
    try:
        merge_chunks(engine.stream(prompt(40, start=500), params(2, forced=2)))
        monkeypatch.setattr(slot_model, "decode", decode)
        results = run_together(engine, requests)
    finally:
        engine.shutdown()
    assert failures == [2]
    for (ids, _), result in zip(requests, results, strict=True):
        assert result.token_ids == generated(loaded, ids, 20, forced=20)


def test_embedding_forwards_hold_at_most_the_tokens_set_aside(tiny_7b, monkeypatch):
    texts = [f"document {i} " + "word " * i for i in range(12)]  # 3 to 14 tokens
    whole = Baichuan2Embeddings(model=str(tiny_7b), batch_size=16).embed_documents(texts)
    tokens = []
    original = embeddings.Baichuan2Embeddings._embed_batch

    def spy(self, loaded, batch_ids, adapter=None):
        tokens.append(len(batch_ids) * max(map(len, batch_ids)))
        return original(self, loaded, batch_ids, adapter)

    monkeypatch.setattr(embeddings, "EMBEDDING_FORWARD_TOKENS", 64)
    monkeypatch.setattr(embeddings.Baichuan2Embeddings, "_embed_batch", spy)
    cut = Baichuan2Embeddings(model=str(tiny_7b), batch_size=16).embed_documents(texts)
    assert len(tokens) > 1 and max(tokens) <= 64
    assert torch.allclose(torch.tensor(cut), torch.tensor(whole), atol=1e-5)


def test_the_prefix_cache_evicts_before_copying_a_new_entry():
    cache = PrefixCache(budget_tokens=10)
    held_while_copying = []

    class Probe:  # stands for a layer's keys/values: records what the store held
        def clone(self):
            held_while_copying.append(cache.stored_tokens)
            return self

    cache.store(range(8), [(Probe(), Probe())])
    cache.store(range(100, 108), [(Probe(), Probe())])
    assert held_while_copying == [0, 0, 0, 0]  # the first entry left before the copy
    assert cache.entries() == [tuple(range(100, 108))]
