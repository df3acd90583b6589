"""Tiny checkpoints for test classes whose parameters are properties, not fixtures."""

import functools
import tempfile
from pathlib import Path

from langchain_baichuan2.testing import make_tiny_checkpoint


@functools.cache
def tiny_chat_checkpoint(variant: str = "7b") -> Path:
    """One tiny random checkpoint per variant for the whole test session."""
    return make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix=f"tiny-{variant}-")), variant)
