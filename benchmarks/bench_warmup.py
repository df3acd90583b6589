"""Compiling the decode step: one graph per bucket (static) vs one per step class (dynamic).

For each (rows, keys) bucket of buffers of ``--buffer`` positions, prints the seconds
its first call took (the compile, when it compiles) and the step time after, for

- static: ``torch.compile(dynamic=False)``, one graph per bucket (the engine before);
- dynamic: the engine's compiled step (rows, keys and buffer length dynamic, one graph
  per ``slot_model.step_class``),

beside the uncompiled step, then counts the graphs each built and checks that buffers
of twice the length compile nothing new. Inductor caches into a new empty folder, so
every compile is a cold one (as on a machine's first start). A random 7B-shaped
(RoPE) model of ``--hidden`` x ``--layers`` (2 x 64 by default: the size of the test
models; compile time barely depends on it).

    python benchmarks/bench_warmup.py --modes static
    python benchmarks/bench_warmup.py --modes dynamic

Measured on the 2-core CPU of the tests (load average ~5, 2026-12-07), cold, one mode
per process, 3 row x 3 key buckets of buffers of 1024: static 9 graphs, 107 s of first
calls, and 9 more graphs for buffers of 2048; dynamic 3 graphs, 62 s, and none more.
The first compile of a process (~35-50 s) holds most of it. Uncontended steps of this
tiny model: static 0.24-0.44 ms, dynamic 0.25-0.51 ms, uncompiled 0.4-0.8 ms.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-warmup-inductor-")

import torch  # noqa: E402  (after the cache folder is set)
from torch._dynamo.utils import counters  # noqa: E402

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
    parser.add_argument(
        "--modes", default="static,dynamic", help="run one per process for cold compiles"
    )
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
    steps: dict[str, Callable[..., Any]] = {
        "static": static,
        "dynamic": lambda *a: slot_model._compiled_step(None, *a),
    }
    modes = {name: steps[name] for name in args.modes.split(",")}
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
        step(*step_arguments(slot_model, *bucket))  # the last mode's
    again = graphs() - before
    load = os.getloadavg()
    print(
        f"\nhidden {args.hidden} x {args.layers} layers, buffers of {args.buffer} positions, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)\n"
    )
    columns = ["eager ms", *(f"{m} {c}" for m in modes for c in ("first s", "ms"))]
    print(f"| rows x keys | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for (rows, keys), row in table.items():
        print(f"| {rows} x {keys} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    for name in modes:
        seconds = sum(row[f"{name} first s"] for row in table.values())
        print(f"{name}: {built[name]} graphs, {seconds:.0f} s in first calls")
    print(f"{name}, buffers of {2 * args.buffer} positions: {again} new graphs")


if __name__ == "__main__":
    main()
