"""Inter-token latency of a running stream while a long prompt arrives, by prefill chunk size.

One stream decodes; once it runs, a ~4k-token prompt arrives. Unchunked, the stream
waits for the whole prefill; chunked, it gets a token after every chunk. Reported per
chunk size (0: whole prompts): the running stream's largest and median gap between
tokens while the prompt is fed, its median gap before, and the prompt's time to first
token (what chunking costs it).

    python benchmarks/bench_chunked_prefill.py [--hidden 512 --layers 6 --chunks 0 256 512]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from common import bench_checkpoint, model_arguments

from langchain_baichuan2.engines.base import SamplingParams
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import load_model_and_tokenizer


def forced(tokens: int) -> SamplingParams:
    """Greedy, exactly ``tokens`` tokens."""
    return SamplingParams(
        max_new_tokens=tokens, repetition_penalty=1.0, extra=(("min_new_tokens", tokens),)
    )


def measure(engine: NativeEngine, prompt_tokens: int) -> dict[str, float]:
    """Gaps of a running stream around a long prompt's prefill, and its time to first token."""
    arrivals: list[float] = []
    window: dict[str, float] = {}
    running_started = threading.Event()
    done = threading.Event()

    def run() -> None:
        for _ in engine.stream([195, *range(3, 40), 196], forced(4000)):
            arrivals.append(time.perf_counter())
            if len(arrivals) == 20:
                running_started.set()
            if done.is_set():
                return  # closing the stream cancels it

    runner = threading.Thread(target=run)
    runner.start()
    running_started.wait()
    long_prompt = [195, *(1000 + i % 5000 for i in range(prompt_tokens - 2)), 196]
    window["sent"] = time.perf_counter()
    for _ in engine.stream(long_prompt, forced(1)):
        window["first"] = time.perf_counter()
        break
    done.set()
    runner.join()
    before = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b < window["sent"]]
    during = [
        b - a
        for a, b in zip(arrivals, arrivals[1:], strict=False)
        if b > window["sent"] and a < window["first"]
    ]
    return {
        "max_gap": max(during),
        "p50_gap": statistics.median(during),
        "steady": statistics.median(before),
        "tokens": len(during),
        "ttft": window["first"] - window["sent"],
    }


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser())
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model_and_tokenizer(bench_checkpoint(args, "chunked"))
    print(
        f"{args.layers} layers x {args.hidden} hidden, a {args.prompt_tokens}-token prompt "
        "arriving while one stream decodes (median of "
        f"{args.repeats} runs; gaps in ms)"
    )
    print("| chunk | max gap | p50 gap | gap before | tokens while fed | prompt TTFT (s) |")
    print("|---|---|---|---|---|---|")
    for chunk in args.chunks:
        engine = NativeEngine(loaded, prefill_chunk_tokens=chunk)
        try:
            measure(engine, 600)  # warm-up: buffers, the weights' CPU layout
            runs = [measure(engine, args.prompt_tokens) for _ in range(args.repeats)]
        finally:
            engine.shutdown()

        def median(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[key] for run in runs)

        print(
            f"| {chunk or 'off'} | {1000 * median('max_gap'):.0f} | "
            f"{1000 * median('p50_gap'):.0f} | {1000 * median('steady'):.0f} | "
            f"{median('tokens'):.0f} | {median('ttft'):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
