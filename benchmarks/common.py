"""What the benchmark scripts share: a measurable random checkpoint and its arguments."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from langchain_baichuan2.testing import make_tiny_checkpoint

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "baichuan2" / "tokenizer.model"


def model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--hidden`` and ``--layers`` (the size of the random model)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    return parser


def bench_checkpoint(args: argparse.Namespace, name: str, *, real_vocab: bool = True) -> Path:
    """A random 7B-shaped checkpoint of ``args.hidden`` x ``args.layers``.

    It uses the real 125,696-piece tokenizer when ``../shared`` has it (so the head costs
    what it costs in the real model), else a tiny trained one.
    """
    use_real = real_vocab and REAL_TOKENIZER.is_file()
    return make_tiny_checkpoint(
        tempfile.mkdtemp(prefix=f"bench-{name}-"),
        "7b",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        tokenizer_model=REAL_TOKENIZER if use_real else None,
    )
