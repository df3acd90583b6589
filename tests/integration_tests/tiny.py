"""Tiny checkpoints for test classes whose parameters are properties, not fixtures."""

import contextvars
import functools
import tempfile
import threading
from pathlib import Path

import torch

from langchain_baichuan2.engines.base import merge_chunks
from langchain_baichuan2.testing import make_tiny_checkpoint


@functools.cache
def tiny_chat_checkpoint(variant: str = "7b") -> Path:
    """One tiny random checkpoint per variant for the whole test session."""
    return make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix=f"tiny-{variant}-")), variant)


def picked_tokens(token: int, rows: int) -> torch.Tensor:
    """What ``NativeEngine._pick`` returns when every row picks ``token`` without failing."""
    return torch.tensor([[token] * rows, [0] * rows, [0] * rows])


def run_together(engine, requests):
    """Stream every (ids, params) from its own thread, announced as one group."""
    results = {}

    def run(i, ids, p):
        try:
            results[i] = merge_chunks(engine.stream(ids, p))
        except Exception as e:  # the test looks at each outcome
            results[i] = e

    with engine.gather(len(requests)):
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(run, i, *r))
            for i, r in enumerate(requests)
        ]
        for thread in threads:
            thread.start()
    for thread in threads:
        thread.join(120)
    return [results[i] for i in range(len(requests))]


def stream_in_background(engine, ids, p):
    """Stream (ids, p) on a thread of its own.

    Returns the thread, an event set at its first chunk, and a dict whose ``"reply"``
    is the merged reply once the thread has ended.
    """
    first_chunk = threading.Event()
    outcome = {}

    def run():
        chunks = []
        for chunk in engine.stream(ids, p):
            chunks.append(chunk)
            first_chunk.set()
        outcome["reply"] = merge_chunks(iter(chunks))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, first_chunk, outcome
