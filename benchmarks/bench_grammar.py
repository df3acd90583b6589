"""Decode speed with and without the grammar processor, and grammar compile time.

Uses the real 125,696-piece vocabulary (``../shared/baichuan2/tokenizer.model``) on a
random model, so the per-step cost of masking the full vocabulary is what is measured.

    python benchmarks/bench_grammar.py [--hidden 512 --layers 6 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

from common import REAL_TOKENIZER, bench_checkpoint, model_arguments
from langchain_core.messages import HumanMessage

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.base import merge_chunks
from langchain_baichuan2.grammar import GrammarCompiler
from langchain_baichuan2.prompt import eos_token_ids
from langchain_baichuan2.tools import Constraint, format_tools


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather of a city."""
    return ""


def search(query: str, max_results: int = 5, sites: list[str] | None = None) -> str:
    """Search the web."""
    return ""


def book_flight(origin: str, destination: str, date: str, passengers: int) -> str:
    """Book a flight."""
    return ""


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser())
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not REAL_TOKENIZER.is_file():
        raise SystemExit(f"needs the real tokenizer at {REAL_TOKENIZER}")

    folder = bench_checkpoint(args, "grammar")
    n = args.new_tokens
    llm = ChatBaichuan2(
        model=str(folder),
        temperature=0,
        max_tokens=n,
        model_kwargs={"min_new_tokens": n},
        prefix_cache_tokens=0,
    )
    loaded = llm.loaded_model()
    tools = format_tools([get_weather, search, book_flight])

    start = time.perf_counter()
    eos = eos_token_ids(loaded.generation_config, loaded.tokenizer)
    compiler = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, eos)
    info_s = time.perf_counter() - start
    start = time.perf_counter()
    forced = Constraint("tools", tools=tuple(tools), choice="required")
    compiler.compile(forced)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        compiler.compile(forced)
    cached_s = (time.perf_counter() - start) / 100

    # "auto" keeps free text possible, so both runs decode exactly n tokens of text.
    messages = [HumanMessage("Write a long story about the weather.")]

    def decode_seconds(kwargs: dict) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            call = llm._prepare(messages, None, kwargs)
            start = time.perf_counter()
            out = merge_chunks(call.engine.stream(call.prompt.input_ids, call.params))
            assert out.completion_tokens == n, out.completion_tokens
            best = min(best, time.perf_counter() - start)
        return best

    plain = decode_seconds({})
    constrained = decode_seconds({"tools": tools, "tool_choice": "auto"})
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, real vocab "
        f"{loaded.model.config.vocab_size}, fp32, CPU; {n} tokens"
    )
    print(f"tokenizer info + compiler: {info_s * 1000:.0f} ms (once per tokenizer)")
    print(
        f"compile 3 tools (forced): cold {cold_s * 1000:.1f} ms, cached {cached_s * 1000:.3f} ms "
        f"(target < 5 ms)"
    )
    print(
        f"decode tok/s: unconstrained {n / plain:.1f}, with grammar {n / constrained:.1f}, "
        f"ratio {plain / constrained:.2f}x (target >= 0.85x)"
    )


if __name__ == "__main__":
    main()
