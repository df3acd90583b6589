"""Compiling the decode step: one graph per bucket (static) vs one per step class (dynamic).

For each (rows, keys) bucket of buffers of ``--buffer`` positions, prints the seconds
its first call took (the compile, when it compiles) and the step time after, for

- static: ``torch.compile(dynamic=False)``, one graph per bucket (the engine before);
- dynamic: the engine's compiled step (rows, keys and buffer length dynamic, one graph
  per ``slot_model.step_class``),

beside the uncompiled step, then counts the graphs each built and checks that buffers
of twice the length compile nothing new. Inductor's on-disk cache is off, so every
compile is a real one. A random 7B-shaped (RoPE) model of ``--hidden`` x ``--layers``
(2 x 64 by default: the size of the test models; compile time barely depends on it).

    python benchmarks/bench_warmup.py

Measured on the 2-core CPU of the tests (load average ~10, 2026-12-07), 3 row x 3 key
buckets: static 9 graphs, 142 s of first calls; dynamic 3 graphs, 84 s; buffers of
another length: 0 new graphs. Compiled steps of this tiny model take 0.2-0.5 ms static
and 0.2-0.6 ms dynamic (guards on symbolic sizes cost ~0.1 ms a step).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.utils import counters

from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def step_arguments(slot_model: SlotModel, rows: int, keys: int) -> tuple[Any, ...]:
    """A step's arguments for ``rows`` x ``keys`` (rows at position ``keys - 1``)."""
    ids = torch.full((rows, 1), 7, dtype=torch.long)
    positions = torch.full((rows, 1), keys - 1, dtype=torch.long)
    cos, sin = slot_model._rope_tables()
    return (ids, positions, *slot_model._static_views(rows, keys), cos, sin, None)


def timed(step: Callable[..., Any], arguments: tuple[Any, ...], repeats: int) -> float:
    """Fastest milliseconds of ``step(*arguments)`` (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(*arguments)
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--keys", default="256,512,1024")
    parser.add_argument("--buffer", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False
    torch._dynamo.config.recompile_limit = 64  # static: one graph per bucket
    folder = make_tiny_checkpoint(
        tempfile.mkdtemp(prefix="bench-warmup-"),
        "7b",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
    )
    slot_model = SlotModel(load_model_and_tokenizer(folder).model, compile=True)
    slot_model._lay_out()
    rows_list = [int(n) for n in args.rows.split(",")]
    keys_list = [int(n) for n in args.keys.split(",")]
    slot_model.cache.reserve(max(rows_list), args.buffer)
    buckets = [(r, k) for r in rows_list for k in keys_list if k <= slot_model.cache.length]
    static = torch.compile(slot_model._last_hidden, dynamic=False)
    modes: dict[str, Callable[..., Any]] = {
        "static": static,
        "dynamic": lambda *a: slot_model._compiled_step(None, *a),
    }
    table: dict[tuple[int, int], dict[str, float]] = {b: {} for b in buckets}
    built = {}
    for name, step in modes.items():
        torch._dynamo.reset()
        before = graphs()
        for bucket in buckets:
            arguments = step_arguments(slot_model, *bucket)
            started = time.perf_counter()
            step(*arguments)
            table[bucket][f"{name} first s"] = time.perf_counter() - started
            table[bucket][f"{name} ms"] = timed(step, arguments, args.repeats)
            print(bucket, name, f"{table[bucket][f'{name} first s']:.1f} s", flush=True)
        built[name] = graphs() - before
    for bucket in buckets:
        arguments = step_arguments(slot_model, *bucket)
        table[bucket]["eager ms"] = timed(slot_model._last_hidden, arguments, args.repeats)
    slot_model.cache.reserve(max(rows_list), 2 * args.buffer)  # buffers of another length
    before = graphs()
    for bucket in buckets:
        slot_model._compiled_step(None, *step_arguments(slot_model, *bucket))
    again = graphs() - before
    load = os.getloadavg()
    print(
        f"\nhidden {args.hidden} x {args.layers} layers, buffers of {args.buffer} positions, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)\n"
    )
    columns = ["eager ms", "static first s", "static ms", "dynamic first s", "dynamic ms"]
    print(f"| rows x keys | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for (rows, keys), row in table.items():
        print(f"| {rows} x {keys} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    for name in modes:
        seconds = sum(row[f"{name} first s"] for row in table.values())
        print(f"{name}: {built[name]} graphs, {seconds:.0f} s in first calls")
    print(f"dynamic, buffers of {2 * args.buffer} positions: {again} new graphs")


if __name__ == "__main__":
    main()
