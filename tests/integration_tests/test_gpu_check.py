"""benchmarks/gpu_check.py on tiny shapes on the CPU: every code path but CUDA's.

The compiled step is simulated (``torch.compile`` returns the function itself), as a
real CPU compile of each shape takes about a minute; a failing compiler and a failing
warm-up must never be reported as compiled.
"""

import importlib.util
import math
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from langchain_baichuan2.decoding import IncrementalDecoder
from langchain_baichuan2.engines.native.batch import Row

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# Short lengths: one key bucket, so the warm-up has 4 row buckets to "compile".
TINY = ["--tiny", "--device", "cpu", "--prompt-tokens", "48", "--context", "128"]


@pytest.fixture
def gpu_check(monkeypatch):
    """The benchmark script as a module (it imports ``common`` from its folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("common", None)


def passthrough_compile(calls):
    def compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    return compile


def test_every_model_and_mode(gpu_check, monkeypatch, capsys):
    calls, decoded = [], []
    monkeypatch.setattr(torch, "compile", passthrough_compile(calls))
    row_init = Row.__init__

    def keep_row(self, *args):
        row_init(self, *args)
        decoded.append(self)

    monkeypatch.setattr(Row, "__init__", keep_row)
    rows = gpu_check.main([*TINY, "--new-tokens", "6"])
    out = capsys.readouterr().out

    # Every request took the default sampling path: nothing masked, nothing suppressed.
    assert decoded and not any(row.restricted or row.min_new_tokens for row in decoded)

    assert [r["model"] for r in rows] == ["7B bf16", "13B bf16", "7B nf4"]
    assert calls, "the compiled engine never compiled"
    for row in rows:
        assert row["prefill tok/s"] > 0
        for batch in (1, 8):
            assert row[f"b{batch} eager tok/s"] > 0
            assert 0 < row[f"b{batch} eager % bound"] < math.inf
        assert 0 < row["eager peak GiB"]
        assert row["generate() b1 tok/s"] > 0
    for row in rows[:2]:  # bf16: compiled too; nf4 stays eager
        assert row["compile status"].startswith("compiled (")
        assert row["b8 compiled tok/s"] > 0 and row["warm-up s"] > 0
    assert "compile status" not in rows[2] and "b1 compiled tok/s" not in rows[2]
    # One table (a header and a rule), then the three goals, all n/a without a GPU.
    lines = out.splitlines()
    assert sum(line.startswith("| model |") for line in lines) == 1
    assert sum(line.startswith("|---") for line in lines) == 1
    goals = [line for line in lines if line.startswith("goal, 7B bf16")]
    assert len(goals) == 3 and all(line.endswith("n/a (no GPU)") for line in goals)
    assert "b1 compiled share of the bandwidth bound" in goals[0]


def test_the_tokenizer_decodes_every_id_of_the_model(gpu_check):
    tokenizer = gpu_check.covering_tokenizer(4096)
    assert len(tokenizer) == 4096  # the tiny trained tokenizer has ~1,800 pieces
    decoder = IncrementalDecoder(tokenizer)  # the engine's detokenizer
    text = decoder.push(range(3, 4096)) + decoder.flush()
    assert re.search(r"<unused_\d+><unused_\d+>$", text)
    assert tokenizer.encode("hello world") == gpu_check.covering_tokenizer(2000).encode(
        "hello world"
    )


def broken_compile(fn, **kwargs):
    def step(*args, **kw):
        raise RuntimeError("no C++ compiler here")

    return step


def test_a_failed_compile_is_labelled_eager(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", broken_compile)
    (row,) = gpu_check.main([*TINY, "--models", "7B", "--no-4bit", "--new-tokens", "4"])
    status = row["compile status"]
    assert status.startswith("eager (compile failed: ") and "no C++ compiler here" in status
    goals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("goal")]
    assert "b1 eager share" in goals[0]


def test_a_failed_warm_up_is_labelled_eager(gpu_check, monkeypatch):
    """Out of memory in the warm-up ends it (logged) without marking compiling failed."""
    from langchain_baichuan2.engines.native.slot_model import SlotModel

    def out_of_memory(self, *arguments):
        if self._warming:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return None  # serving: the eager step

    monkeypatch.setattr(SlotModel, "_compiled_step", out_of_memory)
    (row,) = gpu_check.main([*TINY, "--models", "7B", "--no-4bit", "--new-tokens", "4"])
    assert row["compile status"].startswith("eager (compile failed: ")


def test_a_warm_up_past_its_timeout_stops_the_run(gpu_check, monkeypatch, capsys):
    """The warm-up cannot be cancelled: the table so far, nothing labelled compiled."""
    slow = []

    def slow_compile(fn, **kwargs):
        def step(*args, **kw):
            if not slow:  # the first compiled step takes 3 s
                slow.append(True)
                time.sleep(3)
            return fn(*args, **kw)

        return step

    monkeypatch.setattr(torch, "compile", slow_compile)
    before = set(threading.enumerate())
    rows = gpu_check.main([*TINY, "--warmup-timeout", "1", "--new-tokens", "4"])
    for thread in set(threading.enumerate()) - before:  # the warm-up goes on: let it end
        thread.join(30)
    assert [r["model"] for r in rows] == ["7B bf16"]  # neither 13B nor 7B nf4
    assert rows[0]["compile status"] == "eager (warm-up not done in 1.0 s)"
    assert rows[0]["b1 eager tok/s"] > 0 and "b1 compiled tok/s" not in rows[0]
    assert "| 7B bf16 |" in capsys.readouterr().out


def test_peak_counts_what_the_rows_reserved_not_the_buffers(gpu_check, monkeypatch):
    storage = torch.zeros(2, 4, 100, 8, dtype=torch.bfloat16)  # 12,800 bytes
    cache = SimpleNamespace(
        keys=[storage[:1], storage[1:]],  # two views of one storage count once
        values=[torch.zeros(3200, dtype=torch.float32)],  # 12,800 bytes
        position_bytes=1000,
    )
    engine = SimpleNamespace(slot_model=SimpleNamespace(cache=cache))
    monkeypatch.setattr(gpu_check, "peak_allocated", lambda device: 2**30 + 25_600)
    needed = gpu_check.engine_needed(engine, torch.device("cpu"), reserved_positions=2**20)
    assert needed == (2**30 + 2**20 * 1000) / 2**30


@pytest.fixture
def rows_per_card(monkeypatch):
    """benchmarks/rows_per_card.py as a module."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    path = BENCHMARKS / "rows_per_card.py"
    spec = importlib.util.spec_from_file_location("rows_per_card", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("common", None)


def released_parameters(hidden, intermediate, layers, vocab=125696):
    """Parameters of a released Baichuan2 model, counted from its architecture."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def test_rows_per_card_counts_weights_and_rows(rows_per_card, monkeypatch):
    seven, thirteen = rows_per_card.real_config("7B"), rows_per_card.real_config("13B")
    assert rows_per_card.weight_bytes(seven, False) == 2 * released_parameters(4096, 11008, 32)
    assert released_parameters(4096, 11008, 32) == 7_505_973_248  # Baichuan2-7B
    assert rows_per_card.weight_bytes(thirteen, False) == 2 * released_parameters(5120, 13696, 40)
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    four_bit = rows_per_card.weight_bytes(seven, True)
    # 4 bits a weight, an 8-bit scale per 64 and an fp32 scale per 64 x 256: 0.5159 bytes.
    expected = 2 * (released_parameters(4096, 11008, 32) - linears) + linears * 0.5159
    assert four_bit == pytest.approx(expected, rel=1e-4)
    assert rows_per_card.position_bytes(seven) == 32 * 2 * 4096 * 2
    assert rows_per_card.position_bytes(thirteen) == 40 * 2 * 5120 * 2

    # The engine's own budget: below what is free, most of it when much is free.
    free = 60 * 2**30
    assert 0.85 * free - 8 * 2**30 < rows_per_card.kv_budget(seven, free) < free

    monkeypatch.setattr(rows_per_card, "kv_budget", lambda config, free: 10 * 2**30)
    table = {(r["card"], r["model"]): r for r in rows_per_card.rows_table()}
    # 10 GiB of 0.5 MiB positions, less ChatBaichuan2's 4,096-position prefix cache cap.
    assert rows_per_card.PREFIX_TOKENS == 4096
    assert table["80 GB", "7B bf16"]["rows at 1k"] == (20480 - 4096) // 1024 == 16
    assert table["80 GB", "7B bf16"]["rows at 4k"] == 4
    # 10 GiB of 0.78 MiB positions: 13,107, less the cap.
    assert table["80 GB", "13B bf16"]["rows at 1k"] == (13107 - 4096) // 1024 == 8
    assert table["24 GB", "13B bf16"]["rows at 4k"] == "does not fit"
