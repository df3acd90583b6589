"""The native engine: our model in this process, a worker thread, a batched decode loop.

Requests (prompt ids + sampling settings) are queued. The worker prefills each new
request into its own slot of the KV cache (``slots.py``; reusing the KV of a stored
prefix when one matches) and adds it to the running batch between decode steps
(continuous batching); the batch then advances one token for every row at a time
(``slot_model.py``), its tokens chosen on the device (``sampling.py``). Each request
keeps its own sampling settings, stop strings and grammar, gets its own text deltas
(UTF-8 safe, stop strings held back), finish reason, token counts and timings, and can
be cancelled between steps. An error in a prefill reaches that caller, one in a decode
step every caller of the batch; the worker keeps serving.

Admission: a request joins when its whole slot fits, ``min(prompt + max_new_tokens,
context)`` positions reserved up front within a memory budget (``kv_cache_bytes``);
until then it waits in order, so buffers never grow in the middle of decoding and
running out of memory while admitting fails only the newcomer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import psutil
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
)

from langchain_baichuan2.engines.base import (
    Engine,
    EngineStoppedError,
    GenerationChunk,
    OutputText,
    SamplingParams,
    check_top_k,
    deadline_of,
    eos_ids_of,
    reject_unsupported_arguments,
    seconds_to_wait,
    timeout_timer,
)
from langchain_baichuan2.engines.sampling import (
    RowSettings,
    apply_repetition_penalty,
    choose_tokens,
)
from langchain_baichuan2.engines.slot_model import SlotModel
from langchain_baichuan2.engines.slots import SlotCache, doubled_capacity
from langchain_baichuan2.grammar import GrammarCompiler, GrammarMask
from langchain_baichuan2.loading import LoadedModel
from langchain_baichuan2.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

# Most requests decoding at once, whatever the memory budget allows.
DEFAULT_MAX_ROWS = 64
# Share of a GPU's free memory (after loading) the key/value buffers may take by
# default, before the prefill workspace is set aside.
GPU_MEMORY_SHARE = 0.9

# Extra generate() arguments the engine applies as transformers' own processors, built
# from (value, eos ids). They read each row's ids; ``min_new_tokens`` and
# ``suppress_tokens`` are applied directly on the device instead (same rule, no ids).
PROCESSORS: dict[str, Callable[[Any, set[int]], LogitsProcessor]] = {
    "no_repeat_ngram_size": lambda v, eos: NoRepeatNGramLogitsProcessor(int(v)),
    "bad_words_ids": lambda v, eos: NoBadWordsLogitsProcessor([list(w) for w in v], sorted(eos)),
}
EXTRA_ARGUMENTS = ("min_new_tokens", "suppress_tokens", *PROCESSORS)


def check_extra_arguments(extra: Sequence[tuple[str, Any]]) -> None:
    """Reject ``generate()`` arguments the native engine does not apply."""
    reject_unsupported_arguments(extra, list(EXTRA_ARGUMENTS), "native")


# Put in an engine's inbox to stop its worker, or to wake it for a warm-up.
_SHUTDOWN = object()
_WAKE = object()


def prefill_workspace_bytes(config: Any, context: int) -> int:
    """Memory a prefill of ``context`` tokens may need beside the key/value buffers.

    A rough bound: the attention mask (per head for ALiBi, with fp32 intermediates)
    plus 1 GiB for activations, logits and allocator slack.
    """
    heads = config.num_attention_heads if config.position_embedding == "alibi" else 1
    return 2**30 + 8 * heads * context * context


def default_kv_cache_bytes(cache: SlotCache, config: Any, context: int) -> int:
    """The key/value budget when none is given.

    On a GPU: 90% of the memory free on each layer's device after loading (counting
    torch's cached free blocks), less a prefill workspace, for that device's share of
    the layers. On a CPU: a quarter of the memory available after loading.
    """
    layers = Counter(cache.devices)
    per_layer_position = cache.position_bytes // len(cache.devices)
    positions = []
    for device, count in layers.items():
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            usable = GPU_MEMORY_SHARE * free - prefill_workspace_bytes(config, context)
        else:
            usable = psutil.virtual_memory().available / 4
        positions.append(max(0, int(usable)) // (count * per_layer_position))
    return min(positions) * cache.position_bytes


@dataclass
class _Gather:
    """Requests a ``gather`` block still expects."""

    remaining: int


# The gather (if any) that the current thread or task submits for.
_current_gather: contextvars.ContextVar[_Gather | None] = contextvars.ContextVar(
    "baichuan2_gather", default=None
)


class _Request:
    """One queued generation and the channel its chunks travel back on.

    Sync callers read a thread-safe queue; async callers get an ``asyncio.Queue``
    fed through their event loop, so waiting never occupies a thread.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        reserved: int,
        grammar: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.reserved = reserved  # positions its slot holds: the prompt and every token
        self.grammar = grammar  # the constraint compiled by xgrammar, or None
        self.cancelled = threading.Event()
        self.loop = loop
        self.outbox: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop is not None else queue.SimpleQueue()
        )

    def send(self, item: GenerationChunk | BaseException) -> None:
        if self.loop is None:
            self.outbox.put_nowait(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self.cancelled.set()


class _Row:
    """Decoding state of one request inside a running batch."""

    def __init__(self, request: _Request, engine: NativeEngine) -> None:
        self.request = request
        params = request.params
        self.text = OutputText(engine.tokenizer, params, engine.eos_ids)
        self.generator: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator(device=engine.device).manual_seed(params.seed)
        self.cached_tokens = 0
        self.prompt_seconds = 0.0
        self.started = time.perf_counter()
        extra = dict(params.extra)
        self.min_new_tokens = int(extra.pop("min_new_tokens", 0))
        suppressed = list(extra.pop("suppress_tokens", []))
        self.suppressed = (
            torch.tensor(suppressed, dtype=torch.long, device=engine.device) if suppressed else None
        )
        self.processors = [PROCESSORS[name](value, engine.eos_ids) for name, value in extra.items()]
        self.grammar = (
            GrammarMask(request.grammar, engine.vocab_size, engine.device)
            if request.grammar is not None
            else None
        )
        self.slot = -1
        self.ids = list(request.prompt_ids)  # the prompt, then every token picked
        self.length = 0  # tokens whose keys/values are in the slot

    @property
    def restricted(self) -> bool:
        """Whether the row masks logits on every step (processors, suppression, grammar)."""
        return bool(self.processors) or self.suppressed is not None or self.grammar is not None

    @property
    def generated(self) -> int:
        """Tokens picked so far."""
        return len(self.ids) - len(self.request.prompt_ids)

    def summary(self) -> GenerationChunk:
        """The final chunk: finish reason, measured counts and timings."""
        return self.text.summary(
            len(self.request.prompt_ids), self.cached_tokens, self.prompt_seconds, self.started
        )


class _Batch:
    """The running rows, the device tensors describing them, and their next-token logits.

    Settings, slots and positions are tensors rebuilt only when a row joins, leaves or
    moves; a step advances positions and appends the new tokens to the seen ids in place.
    """

    def __init__(self, engine: NativeEngine) -> None:
        self.engine = engine
        self.rows: list[_Row] = []
        device = engine.device
        self.logits = torch.empty(0, engine.vocab_size, device=device)  # [B, V]
        # Every id each row has fed or picked (for the repetition penalty), padded with
        # the row's first id, which it has seen anyway: [B, capacity].
        self.seen_ids = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._refresh()

    def _describe(
        self, rows: list[_Row]
    ) -> tuple[RowSettings, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Settings, slot index, positions and seen counts of ``rows`` on the device."""
        engine = self.engine
        settings = RowSettings(
            [row.request.params for row in rows],
            [row.generator for row in rows],
            engine.vocab_size,
            engine.device,
        )
        return (
            settings,
            torch.tensor([r.slot for r in rows], device=engine.device),
            torch.tensor([r.length for r in rows], device=engine.device),
            torch.tensor([len(r.ids) for r in rows], device=engine.device),
        )

    def _refresh(self) -> None:
        self.settings, self.slot_index, self.positions, self.seen_count = self._describe(self.rows)

    def refresh_slots(self) -> None:
        """Rebuild the slot index after rows moved to other slots."""
        self.slot_index = torch.tensor([r.slot for r in self.rows], device=self.engine.device)

    def _with_seen_capacity(self, length: int) -> torch.Tensor:
        """The seen ids with room for ``length`` per row (doubling, padded with first ids)."""
        capacity = doubled_capacity(length, self.seen_ids.shape[1])
        if capacity == self.seen_ids.shape[1]:
            return self.seen_ids
        padding = self.seen_ids[:, :1].expand(-1, capacity - self.seen_ids.shape[1])
        return torch.cat([self.seen_ids, padding], dim=1)

    def add(self, row: _Row, logits: torch.Tensor) -> None:
        """Join a prefilled row; if that fails, the batch is left as it was.

        The seen ids get room for every token the row may ever see, so they do not
        grow while it decodes.
        """
        seen_ids = self._with_seen_capacity(row.request.reserved + 1)
        seen = seen_ids.new_full((1, seen_ids.shape[1]), row.ids[0])
        seen[0, : len(row.ids)] = torch.tensor(row.ids, device=self.engine.device)
        rows = [*self.rows, row]
        joined = torch.cat([self.logits, logits]), torch.cat([seen_ids, seen])
        described = self._describe(rows)
        self.rows, (self.logits, self.seen_ids) = rows, joined
        self.settings, self.slot_index, self.positions, self.seen_count = described

    def see(self, tokens: torch.Tensor) -> None:
        """Append each row's picked token to its seen ids."""
        self.seen_ids = self._with_seen_capacity(max(len(r.ids) for r in self.rows) + 1)
        self.seen_ids.scatter_(1, self.seen_count[:, None], tokens[:, None])
        self.seen_count += 1

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at ``index``."""
        select = torch.tensor(index, dtype=torch.long, device=self.engine.device)
        self.rows = [self.rows[i] for i in index]
        self.logits, self.seen_ids = self.logits[select], self.seen_ids[select]
        self._refresh()

    def release(self) -> None:
        """Free every row's slot (the batch is over)."""
        for row in self.rows:
            self.engine.slot_model.cache.release(row.slot)
        self.rows = []


class NativeEngine(Engine):
    """Runs generation for one loaded model on a background worker thread.

    Args:
        loaded: The model, tokenizer and generation defaults to serve.
        compile: Compile the decode step with ``torch.compile``; None: only on a CUDA
            GPU (see ``set_compile``).
        kv_cache_bytes: Memory the key/value buffers of running requests may take;
            requests beyond it wait for a running one to end. None: 90% of the GPU
            memory free after loading, less a prefill workspace (see
            ``default_kv_cache_bytes``); a quarter of the memory available on a CPU.
        max_rows: Most requests decoding at once.

    Attributes:
        context_length: Longest sequence (prompt and output) a request may reach:
            ``model_max_length``, within ``max_position_embeddings`` where the config
            has it. Longer prompts are refused; output stops there (``"length"``).
    """

    # How long the worker waits for the rest of an announced group (see ``gather``).
    GATHER_TIMEOUT = 1.0
    # How often a waiting caller checks that the worker is still alive.
    POLL_SECONDS = 1.0

    def __init__(
        self,
        loaded: LoadedModel,
        compile: bool | None = None,
        kv_cache_bytes: int | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.context_length = self.model.config.context_length
        self.device = next(self.model.parameters()).device
        self.eos_ids = eos_ids_of(loaded.generation_config)
        self.vocab_size = self.model.config.vocab_size
        self._inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._pending: deque[_Request] = deque()  # taken from the inbox, not yet admitted
        self._worker: threading.Thread | None = None
        self._lock = threading.Condition()
        self._gathers: list[_Gather] = []
        self._closed = False
        self.prefix_cache = PrefixCache()
        self._eos_index = torch.tensor(sorted(self.eos_ids), device=self.device)
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.slot_model = SlotModel(self.model, max_length=self.context_length, max_rows=max_rows)
        cache = self.slot_model.cache
        if kv_cache_bytes is None:
            kv_cache_bytes = default_kv_cache_bytes(cache, self.model.config, self.context_length)
        if kv_cache_bytes < cache.position_bytes:
            msg = (
                f"kv_cache_bytes={kv_cache_bytes} cannot hold one position of this model's "
                f"keys and values ({cache.position_bytes} bytes)"
            )
            raise ValueError(msg)
        cache.max_bytes = kv_cache_bytes
        self.kv_cache_bytes = kv_cache_bytes
        # bitsandbytes layers run uncompiled (checked once: set_compile runs per call).
        self._quantized = any(
            type(module).__module__.startswith("bitsandbytes") for module in self.model.modules()
        )
        self._warm_up_wanted = False
        self._warmed = threading.Event()  # set once a warm-up ended (or was not needed)
        self.set_compile(compile)

    def set_compile(self, compile: bool | None) -> None:
        """Turn the compiled decode step on or off (None: on only for a CUDA GPU).

        Only unquantized weights compile; if compiling fails, the engine warns and runs
        uncompiled from then on. On a GPU a warm-up starts in the background (see
        ``warm_up``; requests wait for it): it sizes the key/value buffers once, so they
        never grow (growing would need the old and the new buffers at once), and
        compiles every step shape when compiling. Elsewhere each step shape compiles on
        its first use, unless ``warm_up`` is called.
        """
        if compile is None:
            compile = self.device.type == "cuda"
        self.slot_model.compile = bool(compile) and not self._quantized
        if self.device.type == "cuda":
            self._request_warm_up()

    def _request_warm_up(self) -> None:
        """Have the worker warm up the compiled step once, as soon as it is idle."""
        with self._lock:
            if self._warm_up_wanted or self._warmed.is_set() or self._closed:
                return
            self._warm_up_wanted = True
            if self._worker is None:
                self._start_worker()
        self._inbox.put(_WAKE)  # type: ignore[arg-type]

    def warm_up(self, timeout: float | None = None) -> float:
        """Compile the decode step for every batch shape before serving; wait for it.

        The key/value buffers are sized once, at the most rows of the longest
        sequence that ``kv_cache_bytes`` and ``max_rows`` allow, and never grow; then
        the step is compiled (on a GPU, CUDA graphs recorded) for every row bucket and
        key-length bucket, so no later call compiles. Runs on the worker when no
        request is running. Without ``compile`` only the buffers are sized.

        Returns:
            The warm-up's seconds (``slot_model.warmup_seconds``).

        Raises:
            TimeoutError: It did not end within ``timeout`` seconds.
            EngineStoppedError: The engine was shut down before warming up.
        """
        self._request_warm_up()
        if self._closed and not self._warmed.is_set():
            raise EngineStoppedError("The Baichuan2 engine was shut down")
        if not self._warmed.wait(timeout):
            raise TimeoutError(f"The warm-up did not end within {timeout} s")
        return self.slot_model.warmup_seconds or 0.0

    def _warm_up_now(self) -> None:
        """Run a requested warm-up (on the worker, no row running); never raises."""
        self._warm_up_wanted = False
        try:
            with self.loaded.lock:
                self.slot_model.warm_up()
        except Exception:  # serving goes on uncompiled
            logger.exception("The Baichuan2 engine's warm-up failed")
        finally:
            self._warmed.set()

    # -- submitting -------------------------------------------------------------------

    @contextmanager
    def gather(self, count: int) -> Iterator[None]:
        """Announce ``count`` requests about to arrive from other threads or tasks.

        The worker waits (up to ``GATHER_TIMEOUT``) until they are all queued, so they
        start together as one batch instead of one by one. Only requests submitted from
        inside this context count: asyncio tasks and LangChain's executor threads inherit
        it; a plain ``threading.Thread`` must run in ``contextvars.copy_context()``.
        """
        group = _Gather(count)
        token = _current_gather.set(group)
        with self._lock:
            self._gathers.append(group)
        try:
            yield
        finally:
            _current_gather.reset(token)
            with self._lock:
                self._gathers.remove(group)
                self._lock.notify_all()

    def _compile(self, params: SamplingParams) -> Any:
        """Check a request's settings; return its compiled grammar (or None)."""
        check_extra_arguments(params.extra)
        check_top_k(params, self.vocab_size)
        self._check_token_ids(params)
        return self.grammar_compiler.compile(params.constraint) if params.constraint else None

    def _submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        grammar: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> _Request:
        reserved = self._reserved_length(prompt_ids, params)
        request = _Request(prompt_ids, params, reserved, grammar, loop)
        with self._lock:
            if self._closed:
                raise EngineStoppedError("The Baichuan2 engine was shut down")
            if self._worker is None:
                self._start_worker()
            self._inbox.put(request)
            group = _current_gather.get()
            if group is not None:
                group.remaining -= 1
            self._lock.notify_all()
        return request

    def _reserved_length(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Positions a request's slot must hold: ``min(prompt + max_new_tokens, context)``.

        Raises:
            ValueError: The prompt is empty, longer than the context, or the request
                cannot fit the memory budget even alone.
        """
        if not prompt_ids:
            raise ValueError("The prompt is empty: there is nothing to generate from")
        if len(prompt_ids) > self.context_length:
            msg = (
                f"The prompt (length {len(prompt_ids)}) is longer than the maximum model "
                f"length of {self.context_length}. Shorten it (ChatBaichuan2 cuts prompts "
                "to fit model_max_length - max_tokens; do not raise model_max_length past "
                "the model's context)."
            )
            raise ValueError(msg)
        reserved = min(len(prompt_ids) + params.max_new_tokens, self.context_length)
        longest = self.slot_model.cache.longest
        if longest is not None and reserved > longest:
            cache = self.slot_model.cache
            msg = (
                f"This request needs {reserved} positions of key/value cache "
                f"({reserved * cache.position_bytes / 2**20:.1f} MiB: prompt and max_tokens), "
                f"more than kv_cache_bytes={self.kv_cache_bytes} holds for one request "
                f"({longest} positions). Lower max_tokens or raise kv_cache_bytes."
            )
            raise ValueError(msg)
        return reserved

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The model's grammar compiler (built on first use, shared with its users)."""
        return self.loaded.shared(
            "grammar",
            lambda: GrammarCompiler(self.tokenizer, self.vocab_size, min(self.eos_ids)),
        )

    def set_prefix_cache_tokens(self, tokens: int) -> None:
        """Grow the store of reusable prompt KV caches to ``tokens`` if it is smaller."""
        self.prefix_cache.grow_to(tokens)

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Reject token ids outside the vocabulary before they can reach a batch."""
        for name, value in params.extra:
            if name not in ("suppress_tokens", "bad_words_ids"):
                continue
            ids = [int(i) for item in value for i in (item if name == "bad_words_ids" else [item])]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                msg = f"{name} holds ids outside the vocabulary 0..{self.vocab_size - 1}: {bad[:5]}"
                raise ValueError(msg)
            if name == "suppress_tokens" and len(set(ids)) >= self.vocab_size:
                raise ValueError("suppress_tokens suppresses every token: nothing can be generated")

    def _wait(self, request: _Request, deadline: float | None) -> GenerationChunk:
        """Block for the request's next chunk, raising what the worker sent instead."""
        while True:
            wait = seconds_to_wait(deadline, request.params, self.POLL_SECONDS)
            try:
                item = cast(queue.SimpleQueue, request.outbox).get(timeout=wait)
            except queue.Empty:
                if self._worker is not None and self._worker.is_alive():
                    continue
                item = EngineStoppedError("The Baichuan2 engine's worker stopped unexpectedly")
            if isinstance(item, BaseException):
                raise item
            return item

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GenerationChunk]:
        """Yield text deltas, then a final chunk with the finish reason and counts.

        Leaving the loop early (closing the generator) cancels the request.
        """
        deadline = deadline_of(params)
        request = self._submit(prompt_ids, params, self._compile(params))
        try:
            while True:
                item = self._wait(request, deadline)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            request.cancelled.set()

    async def astream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Async version of :meth:`stream`; waiting never blocks the event loop.

        Cancelling the consuming task cancels the request.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        grammar = await asyncio.to_thread(self._compile, params)
        request = self._submit(prompt_ids, params, grammar, loop)
        timer = timeout_timer(loop, started, params, request.outbox.put_nowait)
        try:
            while True:
                # No polling here: asyncio.wait_for can swallow a cancellation (3.11),
                # and the worker answers every request it took, even when it fails.
                item = await request.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            request.cancelled.set()
            if timer is not None:
                timer.cancel()

    # -- the worker ---------------------------------------------------------------------

    def _take_waiting(self, block: bool) -> tuple[list[_Request], bool]:
        """Take the queued requests; when idle, wait for one and for announced ones.

        Returns the requests and whether the shutdown marker was among them.
        """
        items: list[Any] = []
        if block:
            items.append(self._inbox.get())
            deadline = time.monotonic() + self.GATHER_TIMEOUT
            with self._lock:
                while any(g.remaining > 0 for g in self._gathers):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        requests = [item for item in items if isinstance(item, _Request)]
        return requests, any(item is _SHUTDOWN for item in items)

    def _serve(self) -> None:
        """Continuous batching: new requests join the running batch between steps.

        Requests join in order, each once its slot fits (see ``_admit``). An error while
        admitting one request (out of memory included) reaches that caller only; an
        error in a decode step, or an unexpected one, ends the batch with that error for
        every caller in it. The worker goes on serving until it takes the shutdown
        marker; whenever it stops, every request it holds or that is still queued is
        answered.
        """
        batch: _Batch | None = None
        pending = self._pending
        try:
            while True:
                requests, stopping = self._take_waiting(block=batch is None and not pending)
                pending.extend(requests)
                if stopping:
                    return
                if batch is None and self._warm_up_wanted:
                    self._warm_up_now()
                try:
                    batch = self._admit(batch)
                    if batch is not None:
                        self._step(batch)
                except BaseException as e:  # every caller in the batch must see it
                    for row in batch.rows if batch is not None else []:
                        row.request.send(e)
                    if batch is not None:
                        batch.release()
                    batch = None
                if batch is not None and not batch.rows:
                    batch = None
        finally:
            stopped = EngineStoppedError("The Baichuan2 engine was shut down")
            for row in batch.rows if batch is not None else []:
                row.request.send(stopped)
            if batch is not None:
                batch.release()
            with self._lock:
                closed = self._closed
                if not closed:  # an unexpected exit: a new worker serves what is queued
                    self._start_worker()
            if closed:
                while pending:
                    pending.popleft().send(stopped)
                self._answer_queued(stopped)
                self._warmed.set()

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        """Prefill waiting requests into the batch, in order, while their slots fit.

        A request whose slot does not fit waits (and those behind it) until running
        rows end. One that fails to start gets its error; the others go on.
        """
        pending = self._pending
        while pending:
            request = pending[0]
            if request.cancelled.is_set():
                pending.popleft()
                continue
            running = batch is not None and bool(batch.rows)
            if running and not self.slot_model.cache.fits(request.reserved):
                return batch
            pending.popleft()
            row: _Row | None = None
            try:
                row, logits = self._prefill(request)
                if batch is None:
                    batch = _Batch(self)
                batch.add(row, logits)
            except Exception as e:  # this caller must see it; the others go on
                if row is not None:
                    self.slot_model.cache.release(row.slot)
                request.send(self._admission_error(request, e))
        return batch

    def _admission_error(self, request: _Request, error: Exception) -> Exception:
        """What a request that failed to start is told (out of memory: the numbers)."""
        if not isinstance(error, torch.OutOfMemoryError):
            return error
        msg = (
            f"Out of memory while starting this request (prompt of "
            f"{len(request.prompt_ids)} tokens, {request.reserved} positions of key/value "
            f"cache reserved); the running requests go on. Lower max_tokens, send fewer "
            f"requests at once or give the engine a smaller kv_cache_bytes "
            f"(now {self.kv_cache_bytes}). {error}"
        )
        out_of_memory = torch.OutOfMemoryError(msg)
        out_of_memory.__cause__ = error
        return out_of_memory

    def _start_worker(self) -> None:
        """Start the worker thread (the caller holds ``_lock``)."""
        self._worker = threading.Thread(target=self._serve, name="baichuan2-engine", daemon=True)
        self._worker.start()

    def _answer_queued(self, error: BaseException) -> None:
        """Answer every request still in the inbox with ``error``."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                item.send(error)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker; every request not yet answered gets an error saying so.

        If the worker is still busy after ``timeout`` seconds, it stops (and answers
        everyone) as soon as its current step ends.
        """
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None and worker.is_alive():
            self._inbox.put(_SHUTDOWN)  # type: ignore[arg-type]
            worker.join(timeout)
            if worker.is_alive():
                return  # it reaches the marker after its step and answers the rest
        self._answer_queued(EngineStoppedError("The Baichuan2 engine was shut down"))

    @torch.inference_mode()
    def _prefill(self, request: _Request) -> tuple[_Row, torch.Tensor]:
        """Run one prompt into a free slot (reusing a cached prefix); return row, logits.

        The slot is sized for the request's whole life (``request.reserved``).
        """
        row = _Row(request, self)
        prompt = request.prompt_ids
        reuse = request.params.reuse_prefix
        reused, prefix_kv = self.prefix_cache.lookup(prompt) if reuse else (0, None)
        slots = self.slot_model
        with self.loaded.lock:
            row.slot = slots.acquire(request.reserved)
            try:
                start = time.perf_counter()
                if prefix_kv is not None:
                    slots.write(row.slot, prefix_kv)
                logits = slots.prefill(row.slot, prompt[reused:], reused)
                if logits.device.type == "cuda":  # kernels run asynchronously: wait for them
                    torch.cuda.synchronize(logits.device)
                row.prompt_seconds = time.perf_counter() - start
                if reuse:
                    self._keep_for_reuse(prompt, row.slot)
            except BaseException:
                slots.cache.release(row.slot)
                raise
        row.length = len(prompt)
        row.cached_tokens = reused
        row.started = time.perf_counter()
        return row, logits

    def _keep_for_reuse(self, ids: list[int], slot: int) -> None:
        """Store the KV of ``ids`` (held in ``slot``) in the prefix cache, if memory allows.

        Reuse is an optimization: out of memory here costs the cache entry, not a request.
        """
        try:
            self.prefix_cache.store(ids, self.slot_model.read(slot, len(ids)))
        except torch.OutOfMemoryError:
            logger.warning("No memory to keep a prompt's key/value cache for reuse")

    def _mask_row(self, row: _Row, logits: torch.Tensor) -> None:
        """Apply a row's own restrictions (min_new_tokens, processors, grammar) in place."""
        if row.generated < row.min_new_tokens:
            logits[0, self._eos_index] = -math.inf
        if row.suppressed is not None:
            logits[0, row.suppressed] = -math.inf
        if row.processors:
            ids = torch.tensor([row.ids], device=self.device)
            for processor in row.processors:
                logits[:] = processor(ids, logits)
        if row.grammar is not None:
            row.grammar.apply(logits)

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        """Pick every row's next token, send the text, drop finished rows, advance.

        A row ends at eos, a stop string, ``max_new_tokens`` or the context length
        (``"length"``); a row whose logits hold NaN fails alone.
        """
        rows = batch.rows
        produced_nan = batch.logits.isnan().any(dim=-1)
        logits = apply_repetition_penalty(batch.logits, batch.seen_ids, batch.settings)
        failed: dict[int, Exception] = {}
        for i, row in enumerate(rows):
            if row.restricted or row.generated < row.min_new_tokens:
                try:
                    self._mask_row(row, logits[i : i + 1])
                except Exception as e:  # only this request fails; the batch goes on
                    failed[i] = e
                    logits[i] = 0.0  # a harmless row for the shared sampling below
        picked = self._pick(logits, rows, batch.settings)
        batch.see(picked[0])
        # The step's one wait for the device.
        tokens, excluded, overflowed, nan = torch.cat([picked, produced_nan[None]]).tolist()
        keep = []
        cache = self.slot_model.cache
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if nan[i]:
                cache.clear(row.slot)  # masked NaN keys would still poison the slot's next user
            if row.request.cancelled.is_set():
                continue
            if nan[i]:
                row.request.send(
                    FloatingPointError(
                        "the model produced NaN logits for this request, so it was stopped "
                        f"(dtype {self.slot_model.dtype}; fp16 can overflow: try bfloat16 "
                        "or float32)"
                    )
                )
                continue
            error = failed.get(i) or self._row_error(row, excluded[i], overflowed[i])
            if error is not None:
                row.request.send(error)
                continue
            if row.grammar is not None and not row.grammar.accept(token):
                row.request.send(RuntimeError(f"the grammar rejected token {token}"))
                continue
            row.ids.append(token)
            chunks = [row.text.push(token)]
            if row.text.finish_reason is None and len(row.ids) >= self.context_length:
                chunks.append(row.text.finish("length"))
            for chunk in chunks:
                if chunk is not None and (chunk.text or chunk.token_ids):
                    row.request.send(chunk)
            if row.text.finish_reason is None:
                keep.append(i)
                continue
            if row.request.params.reuse_prefix:
                self._keep_for_reuse(row.ids[: row.length], row.slot)
            row.request.send(row.summary())
        for i, row in enumerate(rows):
            if i not in keep:
                cache.release(row.slot)
        next_tokens = picked[0]
        if len(keep) < len(rows):
            batch.keep(keep)
            next_tokens = next_tokens[keep]
            self._compact(batch)
        if not batch.rows:
            return
        with self.loaded.lock:
            batch.logits = self.slot_model.decode(
                [row.slot for row in batch.rows],
                max(row.length for row in batch.rows) + 1,
                batch.slot_index,
                next_tokens,
                batch.positions,
            )
        for row in batch.rows:
            row.length += 1
        batch.positions += 1

    def _compact(self, batch: _Batch) -> None:
        """Move rows down into freed slots when that shrinks the step's row bucket.

        A step covers slots up to the highest taken one (rounded up to a power of two):
        after rows end, the rows above the bucket their count needs move down (one
        copy of each moved row's keys/values, never on an ordinary step).
        """
        bucket = doubled_capacity(len(batch.rows))
        movers = [row for row in batch.rows if row.slot >= bucket]
        if not movers:
            return
        with self.loaded.lock:
            for row in movers:
                row.slot = self.slot_model.cache.move_down(row.slot, row.length)
        batch.refresh_slots()

    def _pick(self, logits: torch.Tensor, rows: list[_Row], settings: RowSettings) -> torch.Tensor:
        """Each row's token and failure flags, ``[3, B]`` (see ``choose_tokens``)."""
        return choose_tokens(logits, settings)

    @staticmethod
    def _row_error(row: _Row, excluded: int, overflowed: int) -> Exception | None:
        """The error a row's sampling flags stand for, if any."""
        if excluded:
            return ValueError(
                "every token is excluded (by the grammar and the generation "
                "arguments together): nothing can be generated"
            )
        if overflowed:
            params = row.request.params
            return ValueError(
                f"temperature={params.temperature} with repetition_penalty="
                f"{params.repetition_penalty} overflows the logits of this request: "
                "no valid probabilities to sample from"
            )
        return None


def engine_for(
    loaded: LoadedModel,
    compile: bool | None = None,
    kv_cache_bytes: int | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> NativeEngine:
    """Return the one engine serving ``loaded`` (created on first use, with these settings)."""
    return loaded.shared("engine", lambda: NativeEngine(loaded, compile, kv_cache_bytes, max_rows))
