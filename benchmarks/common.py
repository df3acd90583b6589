"""What the benchmark scripts share: a measurable random checkpoint and its arguments."""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.modeling import BaichuanConfig
from langchain_baichuan2.testing import make_tiny_checkpoint

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "baichuan2" / "tokenizer.model"
# The released models' shapes (vocabulary 125,696, context 4,096: BaichuanConfig's defaults).
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "7B": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "position_embedding": "rope",
    },
    "13B": {
        "hidden_size": 5120,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "position_embedding": "alibi",
    },
}


def real_config(name: str, **overrides: Any) -> BaichuanConfig:
    """The config of Baichuan2-``name`` (``"7B"`` or ``"13B"``), with ``overrides``."""
    values = {**REAL_SHAPES[name], **overrides}
    context = values.get("model_max_length", 4096)
    if values["position_embedding"] == "rope":
        values.setdefault("max_position_embeddings", context)
    return BaichuanConfig(**values)


def model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--hidden`` and ``--layers`` (the size of the random model)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    return parser


def decode_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Model size plus the decode-after-a-long-prompt settings (4 layers by default)."""
    model_arguments(parser)
    parser.set_defaults(layers=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def bench_checkpoint(
    args: argparse.Namespace,
    name: str,
    *,
    real_vocab: bool = True,
    variant: Literal["7b", "13b"] = "7b",
) -> Path:
    """A random checkpoint of ``args.hidden`` x ``args.layers`` (7B or 13B shaped).

    It uses the real 125,696-piece tokenizer when ``../shared`` has it (so the head costs
    what it costs in the real model), else a tiny trained one.
    """
    use_real = real_vocab and REAL_TOKENIZER.is_file()
    return make_tiny_checkpoint(
        tempfile.mkdtemp(prefix=f"bench-{name}-"),
        variant,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        tokenizer_model=REAL_TOKENIZER if use_real else None,
    )


def fixed_length_llm(folder: Path, new_tokens: int) -> ChatBaichuan2:
    """A greedy chat model that always decodes exactly ``new_tokens`` tokens.

    ``min_new_tokens`` keeps random weights from stopping early, and prefix reuse is off
    so every call does the same work.
    """
    return ChatBaichuan2(
        model=str(folder),
        temperature=0,
        max_tokens=new_tokens,
        model_kwargs={"min_new_tokens": new_tokens},
        prefix_cache_tokens=0,
    )


def timed_stream(llm: ChatBaichuan2, prompt: str) -> tuple[float, float, int, str]:
    """Seconds to the first chunk, seconds of decoding after it, tokens, text."""
    start = time.perf_counter()
    first = None
    text = []
    tokens = 0
    for chunk in llm.stream(prompt):
        if first is None:
            first = time.perf_counter()
        text.append(chunk.text)
        if chunk.usage_metadata:
            tokens = chunk.usage_metadata["output_tokens"]
    end = time.perf_counter()
    assert first is not None
    return first - start, end - first, tokens, "".join(text)


def concurrent_throughput(llm: ChatBaichuan2, prompts: list[str]) -> tuple[float, list[str]]:
    """Tokens per second of all ``prompts`` streamed at once, and their texts."""
    return streams_rate([llm] * len(prompts), prompts)


def streams_rate(runnables: list[Any], prompts: list[str]) -> tuple[float, list[str]]:
    """Tokens per second of ``prompts[i]`` streamed by ``runnables[i]``, all at once.

    Only the first ``len(runnables)`` prompts are streamed.
    """
    results: dict[int, tuple[float, float, int, str]] = {}

    def worker(i: int) -> None:
        results[i] = timed_stream(runnables[i], prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(runnables))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return sum(r[2] for r in results.values()) / seconds, [results[i][3] for i in sorted(results)]
