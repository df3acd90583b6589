"""Time to first token of the 10th chat turn with prefix KV reuse vs without.

A 10-turn chat whose history reaches ~2,000 tokens: every turn re-sends the whole
history. With reuse the engine prefills only what is new since the previous turn.

    python benchmarks/bench_prefix.py [--hidden 512 --layers 6 --turn-tokens 200]
"""

from __future__ import annotations

import argparse
import time

from common import bench_checkpoint, model_arguments
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from langchain_baichuan2 import ChatBaichuan2


def time_to_first_token(llm: ChatBaichuan2, messages: list[BaseMessage]) -> float:
    start = time.perf_counter()
    for chunk in llm.stream(messages):
        if chunk.content:
            break
    return time.perf_counter() - start


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser())
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=200, help="approx. tokens per turn")
    args = parser.parse_args()

    folder = bench_checkpoint(args, "prefix")
    settings = {"model": str(folder), "temperature": 0, "max_tokens": args.turn_tokens // 2}
    with_reuse = ChatBaichuan2(**settings, prefix_cache_tokens=8192)
    without = ChatBaichuan2(**settings, prefix_cache_tokens=0)
    words = "please explain this part of the plan in more detail " * (args.turn_tokens // 20)

    # Play the conversation with reuse on, as a chat app would: answer each turn.
    history: list[BaseMessage] = [SystemMessage("You are a helpful planning assistant.")]
    for turn in range(args.turns - 1):
        history.append(HumanMessage(f"Turn {turn}: {words}"))
        history.append(AIMessage(with_reuse.invoke(history).content))
    history.append(HumanMessage(f"Turn {args.turns - 1}: {words}"))

    reply = with_reuse.invoke(history, max_tokens=1)  # counts only; warms nothing new
    prompt_tokens = reply.usage_metadata["input_tokens"]
    cached = reply.usage_metadata["input_token_details"]["cache_read"]
    reuse_s = min(time_to_first_token(with_reuse, history) for _ in range(3))
    plain_s = min(time_to_first_token(without, history) for _ in range(3))
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, fp32, CPU; "
        f"last-turn prompt {prompt_tokens} tokens, {cached} reused"
    )
    print(f"{'time to first token':24s} {'seconds':>8s}")
    print(f"{'without reuse':24s} {plain_s:8.3f}")
    print(f"{'with prefix reuse':24s} {reuse_s:8.3f}")
    print(f"speed-up {plain_s / reuse_s:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
