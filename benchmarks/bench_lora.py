"""Decode speed with LoRA adapters: 8 streams over 4 adapters, and a merged one, vs the base.

python benchmarks/bench_lora.py [--hidden 512 --layers 4 --new-tokens 64 --rank 8 --repeats 5]

Greedy, exactly ``--new-tokens`` tokens per stream (``min_new_tokens``), prefix reuse
off. Two phases, each with base streams measured in the same rounds (``--repeats``
rounds of every mode; ratios are paired per round): adapters of the official fine-tune
script's shape (``W_pack``, r=1, alpha 32), then "all linear" adapters of rank
``--rank`` (loaded after the first phase: one model stacks its adapters at the
largest rank).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import bench_checkpoint, model_arguments, streams_rate

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.testing import make_tiny_adapter

ALL_LINEAR = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


def chat(folder: Path, new_tokens: int, **kwargs: Any) -> ChatBaichuan2:
    """A greedy chat model that always decodes exactly ``new_tokens`` tokens."""
    return ChatBaichuan2(
        model=str(folder),
        temperature=0,
        max_tokens=new_tokens,
        model_kwargs={"min_new_tokens": new_tokens},
        prefix_cache_tokens=0,
        **kwargs,
    )


def measure(
    modes: dict[str, Callable[[], tuple[float, list[str]]]], repeats: int, base: dict[str, str]
) -> dict[str, tuple[float, float, list[str]]]:
    """Each mode ``repeats`` times, interleaved: median tok/s and median ratio to its base.

    A ratio pairs each run with the same round's run of its base (``base[mode]``), so
    the load of other jobs, which drifts over minutes, cancels out of it.
    """
    rates: dict[str, list[float]] = {name: [] for name in modes}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name, run in modes.items():
            rate, texts[name] = run()
            rates[name].append(rate)
    result = {}
    for name in modes:
        pairs = zip(rates[name], rates[base.get(name, name)], strict=True)
        ratio = statistics.median(rate / base_rate for rate, base_rate in pairs)
        result[name] = (statistics.median(rates[name]), ratio, texts[name])
    return result


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.set_defaults(layers=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="rank of the all-linear adapters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--small-vocab",
        action="store_true",
        help="a tiny vocabulary instead of the real one: no big head to hide the layers' cost",
    )
    args = parser.parse_args()

    folder = bench_checkpoint(args, "lora", real_vocab=not args.small_vocab)
    root = Path(tempfile.mkdtemp(prefix="bench-lora-adapters-"))
    try:
        run_benchmark(args, folder, root)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, folder: Path, root: Path) -> None:
    """Measure and print the table."""
    n, streams = args.new_tokens, args.streams
    prompts = [f"Stream {i}: " + "tell me about the sea " * (i + 2) for i in range(streams)]
    official = {
        f"wpack{k}": str(make_tiny_adapter(folder, root / f"wpack{k}", seed=k))
        for k in range(args.adapters)
    }
    linear = {
        f"linear{k}": str(
            make_tiny_adapter(folder, root / f"linear{k}", ALL_LINEAR, args.rank, seed=100 + k)
        )
        for k in range(args.adapters)
    }
    llm = chat(folder, n, adapters={**official, **linear})
    base = [llm] * streams

    def over(names: list[str]) -> list[Any]:
        return [llm.bind(adapter=names[i % len(names)]) for i in range(streams)]

    def run(runnables: list[Any]) -> Callable[[], tuple[float, list[str]]]:
        return lambda: streams_rate(runnables, prompts)

    llm.invoke("warm up")
    for name in official:  # read and stack the first phase's adapters before timing
        llm.invoke("warm up", adapter=name)
    modes = {"base": run(base), "official": run(over(list(official)))}
    first = measure(modes, args.repeats, {"official": "base"})

    for name in linear:
        llm.invoke("warm up", adapter=name)
    one = next(iter(linear))
    merged = chat(folder, n, adapter=linear[one], merge_adapter=True)
    merged.invoke("warm up")
    second = measure(
        {
            "base": run(base),
            "linear": run(over(list(linear))),
            "one": run(over([one])),
            "merged": run([merged] * streams),
            "base1": run([llm]),
            "merged1": run([merged]),
        },
        args.repeats,
        {"linear": "base", "one": "base", "merged": "base", "merged1": "base1"},
    )
    identical = second["merged"][2] == second["one"][2]

    vocab = "tiny vocabulary" if args.small_vocab else "the real vocabulary if ../shared has it"
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, {vocab}, fp32, CPU; "
        f"{streams} streams x {n} tokens, greedy; medians of {args.repeats} rounds"
    )
    rows = [
        (f"{streams} streams, {args.adapters} W_pack r=1 adapters", first, "official", 0.8),
        (f"{streams} streams, {args.adapters} all-linear r={args.rank}", second, "linear", 0.8),
        (f"{streams} streams, one all-linear r={args.rank}", second, "one", None),
        (f"{streams} streams, that adapter merged", second, "merged", 0.95),
        ("1 stream, that adapter merged", second, "merged1", 0.95),
    ]
    print(f"{'mode':44s} {'tok/s':>8s} {'base':>8s} {'ratio':>7s} {'target':>7s}")
    for label, phase, key, target in rows:
        rate, ratio, _ = phase[key]
        base_rate = phase["base1" if key == "merged1" else "base"][0]
        goal = f">={target}x" if target else ""
        print(f"{label:44s} {rate:8.1f} {base_rate:8.1f} {ratio:6.2f}x {goal:>7s}")
    print("ratio: the median over rounds of a mode's tok/s over its base's in the same round")
    print(f"merged text identical to the unmerged adapter's: {identical}")


if __name__ == "__main__":
    main()
