"""Throughput of 8 concurrent streams (continuous batching) vs the same 8 in turn.

python benchmarks/bench_concurrency.py [--hidden 512 --layers 6 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

from common import bench_checkpoint, concurrent_throughput, fixed_length_llm, model_arguments


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser())
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    folder = bench_checkpoint(args, "concurrency")
    n = args.new_tokens
    llm = fixed_length_llm(folder, n)
    prompts = [f"Stream {i}: " + "tell me about the sea " * (i + 2) for i in range(args.streams)]
    llm.invoke("warm up")

    def stream(prompt: str) -> str:
        return "".join(chunk.text for chunk in llm.stream(prompt))

    start = time.perf_counter()
    sequential = [stream(p) for p in prompts]
    sequential_s = time.perf_counter() - start

    rate, concurrent = concurrent_throughput(llm, prompts)
    concurrent_s = args.streams * n / rate  # every stream decodes exactly n tokens
    identical = concurrent == sequential

    total = args.streams * n
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, fp32, CPU; "
        f"{args.streams} streams x {n} tokens"
    )
    print(f"{'mode':12s} {'seconds':>8s} {'tok/s':>8s}")
    print(f"{'sequential':12s} {sequential_s:8.2f} {total / sequential_s:8.1f}")
    print(f"{'concurrent':12s} {concurrent_s:8.2f} {total / concurrent_s:8.1f}")
    print(
        f"throughput ratio {sequential_s / concurrent_s:.2f}x (target >= 3x); "
        f"results identical: {identical}"
    )


if __name__ == "__main__":
    main()
