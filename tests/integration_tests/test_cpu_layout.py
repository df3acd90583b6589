"""The CPU weight layouts and head kernels (``cpu_layout``) against independent truths."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from langchain_baichuan2 import Baichuan2Embeddings, ChatBaichuan2
from langchain_baichuan2.engines.native.cpu_layout import (
    HeadProjection,
    _pause_openmp,
    free_openmp_threads,
    lay_out,
)
from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packing", ["oneDNN", "failing"])
def test_the_head_gives_the_float64_product_for_1_to_16_rows(dtype, packing, monkeypatch, caplog):
    if packing == "failing":  # a torch without oneDNN

        def no_onednn(*args):
            raise RuntimeError("no oneDNN here")

        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_onednn)
    torch.manual_seed(0)
    head = nn.Linear(64, 3000, bias=False, dtype=dtype)
    projection = HeadProjection(head)
    weight = head.weight.double()
    for rows in [1, 2, 3, 8, 16, 1]:  # back to 1: kernels made for other counts stay right
        hidden = torch.randn(rows, 64).to(dtype)
        with torch.inference_mode():
            got = projection(hidden)
        expected = hidden.double() @ weight.T
        assert got.shape == (rows, 3000) and got.is_contiguous() and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
        else:  # bf16 logits, as the plain module gives them
            torch.testing.assert_close(got, head(hidden), rtol=0, atol=0)
    fallback = "blas" if dtype == torch.float32 else "linear"
    assert projection.kernel == (fallback if packing == "failing" else "packed")
    assert ("Packing the head for oneDNN failed" in caplog.text) == (packing == "failing")
    torch.testing.assert_close(head.weight.double(), weight, rtol=0, atol=0)  # same values


def full_forward_logits(model, ids):
    """Next-token logits of ``ids`` from one forward pass without any cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()


@pytest.fixture(scope="module", params=["7b", "13b"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"layout-{request.param}")
    return make_tiny_checkpoint(path, request.param, hidden_size=128)


def decode_rows(model, prompts, steps):
    """Greedy-decode ``prompts`` together in slots 0.. for ``steps``; logits of each step."""
    slots = SlotModel(model)
    rows = [(slots.cache.acquire(len(p) + steps), list(p)) for p in prompts]
    seen = []
    with torch.inference_mode():
        logits = torch.cat([slots.prefill(slot, ids, 0) for slot, ids in rows])
        for _ in range(steps):
            seen.append(logits)
            for (_, ids), row in zip(rows, logits, strict=True):
                ids.append(int(row.argmax()))
            lengths = [len(ids) - 1 for _, ids in rows]
            logits = slots.decode(
                [slot for slot, _ in rows],
                max(lengths) + 1,
                torch.tensor([slot for slot, _ in rows]),
                torch.tensor([ids[-1] for _, ids in rows]),
                torch.tensor(lengths),
            )
    return [ids for _, ids in rows], seen


@pytest.mark.parametrize("batch", [1, 8])
def test_fp32_decode_gives_the_full_forward_logits(folder, batch):
    model = load_model_and_tokenizer(folder, dtype="float32").model
    prompts = [list(range(3 + 7 * row, 40 + 11 * row)) for row in range(batch)]
    sequences, seen = decode_rows(model, prompts, steps=5)
    for step, logits in enumerate(seen):
        for row, ids in enumerate(sequences):
            context = ids[: len(prompts[row]) + step]
            expected = full_forward_logits(model, context)
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-4)


def test_bf16_decode_picks_the_full_forward_greedy_tokens(folder):
    model = load_model_and_tokenizer(folder, dtype="bfloat16").model
    prompts = [list(range(3 + 7 * row, 40 + 11 * row)) for row in range(8)]
    sequences, seen = decode_rows(model, prompts, steps=4)
    compared = 0
    for step, logits in enumerate(seen):
        for row, ids in enumerate(sequences):
            expected = full_forward_logits(model, ids[: len(prompts[row]) + step])
            top = expected.topk(2).values
            if top[0] - top[1] > 0.1:  # beyond bf16's rounding of two different paths
                assert int(logits[row].argmax()) == int(expected.argmax())
                compared += 1
            torch.testing.assert_close(logits[row], expected, rtol=0.05, atol=0.1)
    assert compared >= len(seen) * 4


@pytest.mark.parametrize("folder", ["7b"], indirect=True)
def test_the_packed_head_follows_in_place_changes_of_its_weight(folder, monkeypatch):
    packed = []
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def counted(weight, rows):
        packed.append(tuple(weight.shape))
        return reorder(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", counted)
    model = load_model_and_tokenizer(folder, dtype="bfloat16").model
    lay_out(model)
    head = HeadProjection(model.lm_head)
    hidden = model.config.hidden_size

    def check_against_plain_products():
        for rows in [1, 3, 16, 40]:
            x = torch.randn(rows, hidden).bfloat16()
            with torch.inference_mode():
                logits = head(x)
            torch.testing.assert_close(logits, F.linear(x, head.weight), rtol=0, atol=0)
        return logits

    before = check_against_plain_products()
    assert packed == [tuple(head.weight.shape)]  # once, on first use
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # changed in place, as normalize_head does
    assert not torch.equal(check_against_plain_products(), before)
    assert len(packed) == 2  # packed again, after the change only


TASKS = Path("/proc/self/task")
needs_openmp_pools = pytest.mark.skipif(
    not TASKS.is_dir() or torch.get_num_threads() < 2 or _pause_openmp() is None,
    reason="needs Linux's /proc, GNU OpenMP (torch's on Linux) and 2+ torch threads",
)


def _threads_of_this_process() -> set[str]:
    return set(os.listdir(TASKS))


def _within_5_seconds(condition) -> bool:
    """Whether ``condition()`` holds within 5 s (released pool threads end on their own)."""
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _in_a_fresh_thread(hand_over) -> None:
    """Make a thread's OpenMP pool (a parallel sum), run ``hand_over``, check the pool ended.

    The pool is the threads that appeared with the sum; they must be gone (within 5 s:
    they end on their own after being released) once ``hand_over`` returned.
    """
    errors = []

    def body() -> None:
        try:
            before = _threads_of_this_process()
            torch.ones(10_000_000).sum()  # a parallel region: this thread's pool starts
            pool = _threads_of_this_process() - before
            assert pool, "the parallel sum started no OpenMP threads"
            hand_over()
            ended = _within_5_seconds(lambda: not pool & _threads_of_this_process())
            assert ended, "the pool's threads still run"
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@needs_openmp_pools
def test_freeing_openmp_threads_ends_the_calling_threads_pool():
    _in_a_fresh_thread(lambda: free_openmp_threads(torch.device("cpu")))
    assert float(torch.ones(10_000_000).sum()) == 10_000_000  # pools are made again


@needs_openmp_pools
def test_a_thread_handing_the_engine_a_request_frees_its_openmp_pool(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), max_tokens=3, temperature=0)
    expected = llm.invoke("hello").content  # the worker runs, with its own pool
    answers = []
    _in_a_fresh_thread(lambda: answers.append(llm.invoke("hello").content))
    assert answers == [expected]


@needs_openmp_pools
def test_an_embedding_call_frees_its_threads_openmp_pool(tiny_7b):
    embeddings = Baichuan2Embeddings(model=str(tiny_7b))
    expected = embeddings.embed_query("hello")
    vectors = []
    _in_a_fresh_thread(lambda: vectors.append(embeddings.embed_query("hello")))
    assert vectors == [expected]


@needs_openmp_pools
def test_an_idle_engine_worker_holds_no_openmp_pool(tmp_path):
    llm = ChatBaichuan2(model=str(make_tiny_checkpoint(tmp_path)), max_tokens=3, temperature=0)
    free_openmp_threads(torch.device("cpu"))  # this thread's own pool (making the files) ends
    before = _threads_of_this_process()
    llm.invoke("hello")  # a new engine: its worker, which makes a pool for its products
    worker = next(
        str(t.native_id)
        for t in threading.enumerate()
        if t.name == "baichuan2-engine" and str(t.native_id) not in before
    )
    # The worker alone is new: its pool is gone.
    assert _within_5_seconds(lambda: _threads_of_this_process() - before == {worker})
