"""Tiny checkpoints for test classes whose parameters are properties, not fixtures."""

import functools
import tempfile
from pathlib import Path

import torch

from langchain_baichuan2.testing import make_tiny_checkpoint


@functools.cache
def tiny_chat_checkpoint(variant: str = "7b") -> Path:
    """One tiny random checkpoint per variant for the whole test session."""
    return make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix=f"tiny-{variant}-")), variant)


def picked_tokens(token: int, rows: int) -> torch.Tensor:
    """What ``NativeEngine._pick`` returns when every row picks ``token`` without failing."""
    return torch.tensor([[token] * rows, [0] * rows, [0] * rows])
