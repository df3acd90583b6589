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
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import GenerationConfig

from langchain_baichuan2.decoding import IncrementalDecoder, StopStringMatcher
from langchain_baichuan2.modeling import BaichuanTokenizer
from langchain_baichuan2.tools import ToolChoice


class EngineStoppedError(RuntimeError):
    """The engine stopped (unloaded, shut down or crashed) before the request ended.

    The next call starts a new engine; ``ChatBaichuan2`` retries such a call
    (``max_retries``) when no token had been produced yet.
    """


@dataclass(frozen=True)
class Constraint:
    """What the output must follow, independent of any backend's grammar engine.

    ``kind="json"``: one JSON object, matching ``schema`` when one is given.
    ``kind="tools"``: the tool-call protocol for ``tools`` (OpenAI function dicts)
    under ``choice`` (``"auto"``, ``"required"`` or a tool name).
    """

    kind: Literal["json", "tools"]
    schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    choice: ToolChoice = "auto"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    """Extra ``generate()`` arguments as ``(name, value)`` pairs; each backend says
    which it supports."""
    constraint: Constraint | None = None
    """A constraint the output must follow (tool calls, JSON)."""
    reuse_prefix: bool = True
    """Whether this request may read and add to the engine's prefix cache."""
    timeout: float | None = None
    """Seconds the whole request may take; then it is stopped and raises
    ``TimeoutError``. None: no limit."""

    def __post_init__(self) -> None:
        check_sampling_values(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            timeout=self.timeout,
        )
        check_stops(self.stop)
        check_extra_values(self.extra, self.max_new_tokens)


# Seeds must fit a signed 64-bit integer (torch and vLLM both take them as int64).
SEED_LIMIT = 2**63
# The smallest sampling temperature: below it vLLM clamps silently and the native
# engine's logits overflow, so both backends refuse it (0 is greedy).
MIN_TEMPERATURE = 0.01


def check_sampling_values(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    timeout: float | None = None,
) -> None:
    """Raise ``ValueError`` naming the first out-of-range sampling value."""

    def number(name: str, value: object) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            msg = f"{name} must be a finite number, got {value!r}"
            raise ValueError(msg)
        return float(value)

    if timeout is not None and (number("timeout", timeout) <= 0):
        msg = f"timeout must be > 0 seconds (None for no limit), got {timeout}"
        raise ValueError(msg)
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT
    ):
        msg = f"seed must be an integer in [0, 2**63), got {seed!r}"
        raise ValueError(msg)

    if temperature is not None and (
        number("temperature", temperature) < 0 or 0 < temperature < MIN_TEMPERATURE
    ):
        msg = (
            f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature}; "
            "use 0 for greedy decoding"
        )
        raise ValueError(msg)
    if top_p is not None and not 0 < number("top_p", top_p) <= 1:
        msg = f"top_p must be in (0, 1], got {top_p}"
        raise ValueError(msg)
    if top_k is not None and (number("top_k", top_k) < 0 or int(top_k) != top_k):
        msg = f"top_k must be an integer >= 0 (0 disables it), got {top_k}"
        raise ValueError(msg)
    if repetition_penalty is not None and number("repetition_penalty", repetition_penalty) <= 0:
        msg = f"repetition_penalty must be > 0, got {repetition_penalty}"
        raise ValueError(msg)
    if max_new_tokens is not None and (
        number("max_tokens", max_new_tokens) < 1 or int(max_new_tokens) != max_new_tokens
    ):
        msg = f"max_tokens must be an integer >= 1, got {max_new_tokens}"
        raise ValueError(msg)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_list(value: object) -> bool:
    return isinstance(value, list | tuple) and all(_is_int(i) and i >= 0 for i in value)


def check_stops(stop: Sequence[object]) -> None:
    """Raise unless every stop sequence is a non-empty string.

    Raises:
        TypeError: An item is not a string.
        ValueError: An item is the empty string (it would end every answer at once).
    """
    for index, item in enumerate(stop):
        if not isinstance(item, str) or not item:
            msg = (
                f"stop must be a list of non-empty strings; item {index} is "
                f"{type(item).__name__} {item!r}"
            )
            raise TypeError(msg) if not isinstance(item, str) else ValueError(msg)


def check_extra_values(
    extra: Sequence[tuple[str, Any]], max_new_tokens: int | None = None
) -> None:
    """Raise ``ValueError`` naming the first badly typed or out-of-range extra argument.

    Which backend supports which argument is each backend's own check.
    """
    for name, value in extra:
        if name == "min_new_tokens" and not (_is_int(value) and value >= 0):
            msg = f"min_new_tokens must be an integer >= 0, got {value!r}"
            raise ValueError(msg)
        if name == "min_new_tokens" and max_new_tokens is not None and value > max_new_tokens:
            msg = f"min_new_tokens ({value}) must not exceed max_tokens ({max_new_tokens})"
            raise ValueError(msg)
        if name == "no_repeat_ngram_size" and not (_is_int(value) and value >= 1):
            msg = f"no_repeat_ngram_size must be an integer >= 1, got {value!r}"
            raise ValueError(msg)
        if name == "suppress_tokens" and not _is_id_list(value):
            msg = f"suppress_tokens must be a list of token ids (integers >= 0), got {value!r}"
            raise ValueError(msg)
        if name == "bad_words_ids" and not (
            isinstance(value, list | tuple)
            and value
            and all(_is_id_list(word) and word for word in value)
        ):
            msg = (
                "bad_words_ids must be a list of token-id lists, one per banned sequence "
                f"(e.g. [[5], [7, 8]]), got {value!r}"
            )
            raise ValueError(msg)


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


def reject_unsupported_arguments(
    extra: Sequence[tuple[str, Any]], supported: Sequence[str], backend: str
) -> None:
    """Raise ``ValueError`` naming the ``generate()`` arguments a backend cannot apply."""
    unknown = sorted({name for name, _ in extra} - set(supported))
    if unknown:
        msg = (
            f"Unsupported generate() argument(s) {', '.join(unknown)} on backend "
            f"{backend!r}; supported there: {', '.join(supported)}"
        )
        raise ValueError(msg)


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


def check_top_k(params: SamplingParams, vocab_size: int) -> None:
    """Reject a ``top_k`` larger than the vocabulary (it can only be a mistake)."""
    if params.top_k > vocab_size:
        msg = f"top_k must be at most the vocabulary size {vocab_size}, got {params.top_k}"
        raise ValueError(msg)


def eos_ids_of(generation_config: GenerationConfig) -> set[int]:
    """The ids that end an answer (the checkpoint's eos; 2 when it names none)."""
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos if eos is not None else 2])


class Engine(ABC):
    """What ``ChatBaichuan2`` needs from a backend, and nothing more.

    Attributes:
        tokenizer: The checkpoint's tokenizer (prompts are built with it).
        generation_config: The checkpoint's generation defaults.
        context_length: The checkpoint's ``model_max_length``.
        vocab_size: Rows of the model's head.
    """

    tokenizer: BaichuanTokenizer
    generation_config: GenerationConfig
    context_length: int
    vocab_size: int

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
