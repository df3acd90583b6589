"""ChatBaichuan2 overhead and batching vs calling the model directly, same run.

Prints: greedy decode tokens/s of ``ChatBaichuan2.stream`` vs ``model.generate()`` on
the same prompt ids and length; time to first token vs one forward of the prompt; and
the throughput of ``batch`` of 8 vs 8 sequential invokes.

    python benchmarks/bench_chat.py [--hidden 512 --layers 6 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import bench_checkpoint, fixed_length_llm, model_arguments
from langchain_core.messages import HumanMessage

QUESTION = "Explain the difference between a list and a tuple in Python. " * 4


def best(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser())
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = bench_checkpoint(args, "chat")
    n = args.new_tokens
    llm = fixed_length_llm(folder, n)
    loaded = llm.loaded_model()
    model = loaded.model
    prompt_ids = [195, *loaded.tokenizer.encode(QUESTION, add_special_tokens=False), 196]
    ids = torch.tensor([prompt_ids])
    llm.invoke(QUESTION)  # warm-up

    def generate() -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                repetition_penalty=1.05,
                pad_token_id=0,
            )

    def stream() -> None:
        for _ in llm.stream(QUESTION):
            pass

    generate_s, stream_s = best(generate, args.repeats), best(stream, args.repeats)

    def first_token() -> None:
        for _ in llm.stream(QUESTION):
            break

    def forward() -> None:
        with torch.inference_mode():
            model(ids)

    ttft, forward_s = best(first_token, args.repeats), best(forward, args.repeats)

    prompts = [
        [HumanMessage(f"Question {i}: " + "why is the sky blue? " * (i + 1))] for i in range(8)
    ]
    sequential = best(lambda: [llm.invoke(p) for p in prompts], 1)
    batched = best(lambda: llm.batch(prompts), 1)

    print(
        f"model: hidden {args.hidden}, layers {args.layers}, vocab {model.config.vocab_size}, "
        f"fp32, {torch.get_num_threads()} CPU threads; prompt {len(prompt_ids)} tokens, {n} new"
    )
    print(f"{'measure':38s} {'ours':>10s} {'baseline':>10s} {'ratio':>7s}")
    rows = [
        ("decode tok/s: stream vs generate()", n / stream_s, n / generate_s),
        ("first token s vs one prompt forward", ttft, forward_s),
        ("batch of 8 tok/s vs 8 sequential", 8 * n / batched, 8 * n / sequential),
    ]
    for name, ours, base in rows:
        print(f"{name:38s} {ours:10.3f} {base:10.3f} {ours / base:7.2f}")
    print("targets: stream >= 0.95x generate(); batch of 8 >= 3x sequential")


if __name__ == "__main__":
    main()
