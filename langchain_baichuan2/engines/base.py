"""The engine interface ``ChatBaichuan2`` talks to, and what every backend shares.

An engine turns prompt ids plus sampling settings (and, optionally, a constraint on
the output) into a stream of ``GenerationChunk``s: text deltas, then one final chunk
with the finish reason, measured token counts and timings. Backends (``native``: our
model in this process; ``vllm``: vLLM's engine) implement ``Engine``; the text of a
request (incremental detokenizing, stop strings, finish rules) is ``OutputText``, the
same for every backend, so they give the same text for the same tokens.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from transformers import GenerationConfig

from langchain_baichuan2.decoding import IncrementalDecoder, StopStringMatcher
from langchain_baichuan2.engines.settings import SamplingParams
from langchain_baichuan2.errors import EngineStoppedError as EngineStoppedError  # re-export
from langchain_baichuan2.modeling import BaichuanTokenizer


@dataclass
class GenerationChunk:
    """A piece of one request's output: a text delta, or the final summary."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


class OutputText:
    """One request's output as text: UTF-8-safe deltas, stop strings, finish reason.

    Each generated token is pushed in order; eos ends the request, a completed stop
    string ends it (the stop is not shown), and ``max_new_tokens`` tokens end it with
    ``"length"``. Backends differ in how they pick tokens, never in this.
    """

    def __init__(
        self, tokenizer: BaichuanTokenizer, params: SamplingParams, eos_ids: set[int]
    ) -> None:
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stops = StopStringMatcher(params.stop) if params.stop else None
        self.max_new_tokens = params.max_new_tokens
        self.eos_ids = eos_ids
        self.output_ids: list[int] = []
        self.generated = 0  # tokens produced, counting a final eos
        self.finish_reason: str | None = None

    def push(self, token: int) -> GenerationChunk | None:
        """Take one generated token; return a chunk to send, or None; mark the finish."""
        self.generated += 1
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._final_text()
        self.output_ids.append(token)
        text = self.decoder.push([token])
        if self.stops is not None:
            text, stopped = self.stops.push(text)
            if stopped:
                self.finish_reason = "stop"
                return GenerationChunk(text=text, token_ids=[token])
        if len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
            tail = self._final_text()
            return GenerationChunk(text=text + (tail.text if tail else ""), token_ids=[token])
        return GenerationChunk(text=text, token_ids=[token])

    def finish(self, reason: str) -> GenerationChunk | None:
        """End the output for a reason the backend reports; return the held-back text."""
        self.finish_reason = reason
        return self._final_text()

    def _final_text(self) -> GenerationChunk | None:
        """Release text held back by the decoder and the stop matcher at the end."""
        text = self.decoder.flush()
        if self.stops is not None:
            text, stopped = self.stops.push(text)
            text += "" if stopped else self.stops.flush()
        return GenerationChunk(text=text) if text else None

    def summary(
        self, prompt_tokens: int, cached_tokens: int, prompt_seconds: float, started: float
    ) -> GenerationChunk:
        """The final chunk: finish reason, measured counts and timings."""
        return GenerationChunk(
            finish_reason=self.finish_reason,
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_tokens,
            completion_tokens=self.generated,
            prompt_seconds=prompt_seconds,
            generation_seconds=time.perf_counter() - started,
        )


def timeout_error(params: SamplingParams) -> TimeoutError:
    """The error of a request that ran past its ``timeout``."""
    return TimeoutError(f"The request took longer than timeout={params.timeout} s and was stopped")


def deadline_of(params: SamplingParams) -> float | None:
    """The ``time.monotonic()`` by which the request must end, or None."""
    return None if params.timeout is None else time.monotonic() + params.timeout


def seconds_to_wait(deadline: float | None, params: SamplingParams, poll: float) -> float:
    """How long a blocked caller may wait for its next chunk: ``poll`` at most.

    Raises ``TimeoutError`` once the request's deadline has passed.
    """
    if deadline is None:
        return poll
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error(params)
    return min(poll, left)


def timeout_timer(
    loop: asyncio.AbstractEventLoop,
    started: float,
    params: SamplingParams,
    put: Callable[[BaseException], None],
) -> asyncio.TimerHandle | None:
    """Schedule the request's ``TimeoutError`` on ``loop`` (``started``: loop time).

    Async callers wait on a queue; the error arrives on it at the deadline. None when
    the request has no timeout.
    """
    if params.timeout is None:
        return None
    return loop.call_at(started + params.timeout, put, timeout_error(params))


class Engine(ABC):
    """What ``ChatBaichuan2`` needs from a backend, and nothing more.

    Attributes:
        tokenizer: The checkpoint's tokenizer (prompts are built with it).
        generation_config: The checkpoint's generation defaults.
        context_length: The checkpoint's ``model_max_length``.
        vocab_size: Rows of the model's head.
        max_rows: Most requests it decodes together; more callers only wait (a batch
            needs no more threads than this).
    """

    tokenizer: BaichuanTokenizer
    generation_config: GenerationConfig
    context_length: int
    vocab_size: int
    max_rows: int = 64

    @abstractmethod
    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GenerationChunk]:
        """Yield text deltas, then a final chunk with the finish reason and counts.

        Closing the generator early aborts the request.
        """

    @abstractmethod
    def astream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Async :meth:`stream`; cancelling the consuming task aborts the request."""

    @contextmanager
    def gather(self, count: int) -> Iterator[None]:
        """Announce ``count`` requests about to arrive, so they can start as one batch.

        Engines that batch whatever is waiting need nothing announced (the default).
        """
        yield

    @abstractmethod
    def set_prefix_cache_tokens(self, tokens: int) -> None:
        """Ask for a prefix-cache budget (in tokens); the largest asked for applies.

        Users of one engine never shrink each other's cache; a request that must not
        use it says so itself (``SamplingParams.reuse_prefix``).
        """

    @abstractmethod
    def shutdown(self) -> None:
        """Stop serving; every request still waiting ends with an error saying so."""


def merge_chunks(chunks: Iterator[GenerationChunk]) -> GenerationChunk:
    """Join a request's chunks into one: all text and ids, plus the final summary."""
    text: list[str] = []
    ids: list[int] = []
    last = GenerationChunk()
    for chunk in chunks:
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    last.text = "".join(text)
    last.token_ids = ids
    return last
