"""The native engine: a request queue, admission and the worker's loop.

Requests (prompt ids + sampling settings) are queued. The worker prefills each new
request into its own slot of the KV cache and adds it to the running batch between
decode steps (continuous batching; ``batch.py``). Prompts are fed in chunks: each
worker iteration feeds at most ``prefill_chunk_tokens`` prompt tokens, then runs one
decode step, so a burst of long prompts does not stall the running streams. An error
in a prefill reaches that caller, one in a decode step every caller of the batch; the
worker keeps serving. Out of memory first empties the prefix cache and retries once;
in a decode step it then fails only the newest row.

Admission: a request joins when its whole slot fits, ``min(prompt + max_new_tokens,
context)`` positions reserved up front within the memory budget (``budget.py``), so
buffers never grow in the middle of decoding and running out of memory while admitting
fails only the newcomer. Waiting requests are taken in order, but one that does not
fit yet lets later ones that fit pass it, at most ``MAX_PASSES`` times: then nothing
passes it until it fits, so nobody waits forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from langchain_baichuan2.engines.base import (
    Engine,
    EngineStoppedError,
    GenerationChunk,
    SamplingParams,
    deadline_of,
    seconds_to_wait,
    timeout_timer,
)
from langchain_baichuan2.engines.native.batch import (
    Batch,
    Request,
    Row,
    begin_row,
    feed_prompt,
)
from langchain_baichuan2.engines.native.budget import (
    DEFAULT_MAX_ROWS,
    default_kv_cache_bytes,
    out_of_memory_for_a_request,
)
from langchain_baichuan2.engines.native.cpu_layout import free_openmp_threads
from langchain_baichuan2.engines.native.limits import check_request
from langchain_baichuan2.engines.native.sampling import RowSettings, choose_tokens
from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.engines.native.warmup import WarmUp
from langchain_baichuan2.grammar import GrammarCompiler
from langchain_baichuan2.loading import LoadedModel
from langchain_baichuan2.loading.registry import shared_adapter
from langchain_baichuan2.prompt import eos_token_ids

logger = logging.getLogger(__name__)

# Put in an engine's inbox to stop its worker, or to wake it for a warm-up.
_SHUTDOWN = object()
_WAKE = object()

# Prompt tokens fed between two decode steps (measured: benchmarks/bench_chunked_prefill.py).
DEFAULT_PREFILL_CHUNK_TOKENS = 256


@dataclass(eq=False)  # each group is itself: two groups with equal counts stay two
class _Gather:
    """Requests a ``gather`` block still expects, and until when it may hold the worker."""

    remaining: int
    deadline: float  # time.monotonic(); pushed back each time one of its requests arrives

    def holds(self, now: float) -> bool:
        """Whether the worker should still wait for this group."""
        return self.remaining > 0 and now < self.deadline


# The gather (if any) that the current thread or task submits for.
_current_gather: contextvars.ContextVar[_Gather | None] = contextvars.ContextVar(
    "baichuan2_gather", default=None
)


class NativeEngine(Engine):
    """Runs generation for one loaded model on a background worker thread.

    Args:
        loaded: The model, tokenizer and generation defaults to serve.
        compile: Compile the decode step with ``torch.compile``; None: only on a CUDA
            GPU (see ``set_compile``).
        kv_cache_bytes: Memory the key/value buffers of running requests and the
            prefix cache's stored prompts may take together; requests beyond it wait
            for a running one to end. None: 95% of the GPU memory free after loading,
            less what is set aside for everything else (``budget.Reservations``: a
            prefill chunk's workspace, the step temporaries, the CUDA-graph pool, an
            embedding forward); a quarter of the memory available on a CPU.
        max_rows: Most requests decoding at once.
        prefix_cache_tokens: The prefix cache's first cap (see
            ``set_prefix_cache_tokens``); set before a GPU warm-up sizes the buffers,
            which leave it its share.
        prefill_chunk_tokens: Most prompt tokens fed per worker iteration, between two
            decode steps of the running rows (one prefill call each at most); None or
            0: whole prompts at once.

    Attributes:
        context_length: Longest sequence (prompt and output) a request may reach:
            ``model_max_length``, within ``max_position_embeddings`` where the config
            has it. Longer prompts are refused; output stops there (``"length"``).
        budget: The key/value memory budget (``KvBudget``).
    """

    # How long the worker waits for the rest of an announced group (see ``gather``).
    GATHER_TIMEOUT = 1.0
    # How often a waiting caller checks that the worker is still alive.
    POLL_SECONDS = 1.0
    # How many later requests may start while one that does not fit yet waits.
    MAX_PASSES = 8

    def __init__(
        self,
        loaded: LoadedModel,
        compile: bool | None = None,
        kv_cache_bytes: int | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        prefix_cache_tokens: int = 0,
        prefill_chunk_tokens: int | None = DEFAULT_PREFILL_CHUNK_TOKENS,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.context_length = self.model.config.context_length
        self.device = next(self.model.parameters()).device
        self.eos_ids = set(eos_token_ids(loaded.generation_config, loaded.tokenizer))
        self.vocab_size = self.model.config.vocab_size
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._pending: deque[Request] = deque()  # taken from the inbox, not yet admitted
        self._worker: threading.Thread | None = None
        self._lock = threading.Condition()
        self._gathers: list[_Gather] = []
        self._closed = False
        self.eos_index = torch.tensor(sorted(self.eos_ids), device=self.device)
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.set_prefill_chunk_tokens(prefill_chunk_tokens)
        self.slot_model = SlotModel(self.model, max_length=self.context_length, max_rows=max_rows)
        cache = self.slot_model.cache
        self.budget = cache.budget
        if kv_cache_bytes is None:
            kv_cache_bytes = default_kv_cache_bytes(
                cache.devices,
                cache.position_bytes,
                self.model.config,
                self.context_length,
                max_rows,
                self.prefill_chunk_tokens,
            )
        self.budget.set_bytes(kv_cache_bytes)
        self.prefix_cache = self.budget.prefix
        self.prefix_cache.grow_to(prefix_cache_tokens)
        # bitsandbytes layers run uncompiled (checked once: set_compile runs per call).
        self._quantized = any(
            type(module).__module__.startswith("bitsandbytes") for module in self.model.modules()
        )
        self._warm_up = WarmUp()
        self.set_compile(compile)

    @property
    def kv_cache_bytes(self) -> int:
        """The key/value memory budget in bytes."""
        return cast(int, self.budget.max_bytes)

    def set_compile(self, compile: bool | None) -> None:
        """Turn the compiled decode step on or off (None: on only for a CUDA GPU).

        Only unquantized weights compile; if compiling fails, the engine warns and runs
        uncompiled from then on. On a GPU a warm-up starts at once (see ``warm_up``):
        it allocates the key/value storage once, so it never grows (growing would need
        the old and the new storage at once), and compiles every step class in the
        background while requests run uncompiled. Elsewhere each step class compiles
        on its first use, unless ``warm_up`` is called.
        """
        if compile is None:
            compile = self.device.type == "cuda"
        self.slot_model.compile = bool(compile) and not self._quantized
        if self.device.type == "cuda":
            self._request_warm_up()

    def _request_warm_up(self) -> None:
        """Have the worker warm up the compiled step once, as soon as it is idle."""
        with self._lock:
            if self._closed or not self._warm_up.ask():
                return
            if self._worker is None:
                self._start_worker()
        self._inbox.put(_WAKE)  # type: ignore[arg-type]

    def warm_up(self, timeout: float | None = None) -> float:
        """Compile the decode step for every step class; wait for it.

        The key/value storage is allocated once (as many full-context rows as
        ``kv_cache_bytes``, less the prefix cache's cap, and ``max_rows`` allow; viewed
        later as more, shorter rows when requests reserve less) once no request is
        running. The step then compiles on a background thread, one graph per step
        class (``slot_model.step_class``), while requests run uncompiled until their
        class is ready; a GPU records each bucket's CUDA graph on its first use.
        Without ``compile`` only the storage is allocated.

        Returns:
            The warm-up's seconds (``slot_model.warmup_seconds``).

        Raises:
            TimeoutError: It did not end within ``timeout`` seconds.
            EngineStoppedError: The engine was shut down before warming up.
        """
        self._request_warm_up()
        self._warm_up.wait(timeout, self._closed)
        return self.slot_model.warmup_seconds or 0.0

    # -- submitting -------------------------------------------------------------------

    @contextmanager
    def gather(self, count: int) -> Iterator[None]:
        """Announce ``count`` requests about to arrive from other threads or tasks.

        When idle, the worker waits until they are all queued (up to ``GATHER_TIMEOUT``
        after it wakes, and never longer than ``GATHER_TIMEOUT`` after the group's last
        request arrived), so they start together as one batch instead of one by one.
        More requests than announced (retries, held-back inputs) simply join; fewer only
        cost that wait once. Only requests submitted from inside this context count:
        asyncio tasks and LangChain's executor threads inherit it; a plain
        ``threading.Thread`` must run in ``contextvars.copy_context()``. Groups are
        independent: any number may be open at once, from any threads.
        """
        group = _Gather(max(0, count), time.monotonic() + self.GATHER_TIMEOUT)
        token = _current_gather.set(group)
        with self._lock:
            self._gathers.append(group)
        try:
            yield
        finally:
            _current_gather.reset(token)
            with self._lock:
                self._gathers = [g for g in self._gathers if g is not group]
                self._lock.notify_all()

    def _compile(self, params: SamplingParams) -> Any:
        """Check a request's settings and load its adapter; return its compiled grammar."""
        check_request(params, self.vocab_size)
        if params.adapter is not None:
            self.load_adapter(params.adapter)
        return self.grammar_compiler.compile(params.constraint) if params.constraint else None

    def _submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        grammar: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Request:
        reserved = self.budget.reserved_length(len(prompt_ids), params.max_new_tokens)
        request = Request(prompt_ids, params, reserved, grammar, loop)
        free_openmp_threads(self.device)  # this thread's idle pool would slow the worker
        with self._lock:
            if self._closed:
                raise EngineStoppedError("The Baichuan2 engine was shut down")
            if self._worker is None:
                self._start_worker()
            self._inbox.put(request)
            group = _current_gather.get()
            if group is not None:
                group.remaining = max(0, group.remaining - 1)
                group.deadline = time.monotonic() + self.GATHER_TIMEOUT
            self._lock.notify_all()
        return request

    def load_adapter(self, folder: str) -> None:
        """Serve the LoRA adapter in ``folder`` from now on (read once per loaded model).

        Raises:
            CheckpointError: The adapter cannot be served on this model (named); the
                engine goes on serving everything else.
        """
        adapter = shared_adapter(self.loaded, folder)
        with self.loaded.lock:
            self.slot_model.add_adapter(adapter)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The model's grammar compiler (built on first use, shared with its users)."""
        return self.loaded.shared(
            "grammar",
            lambda: GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_ids)),
        )

    def set_prefill_chunk_tokens(self, tokens: int | None) -> None:
        """Feed at most ``tokens`` prompt tokens between two decode steps (None or 0: all).

        Applies from the worker's next iteration. The default key/value budget was
        sized with the first value's prefill workspace.
        """
        if tokens is not None and tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {tokens}")
        self.prefill_chunk_tokens = tokens or None

    def set_prefix_cache_tokens(self, tokens: int) -> None:
        """Grow the store of reusable prompt KV caches to ``tokens`` if it is smaller.

        The store only ever holds what ``kv_cache_bytes`` leaves the running requests.
        """
        self.prefix_cache.grow_to(tokens)

    def _wait(self, request: Request, deadline: float | None) -> GenerationChunk:
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

    def _take_waiting(self, block: bool) -> tuple[list[Request], bool]:
        """Take the queued requests; when idle, wait for one and for announced ones.

        Returns the requests and whether the shutdown marker was among them.
        """
        items: list[Any] = []
        if block:
            items.append(self._inbox.get())
            until = time.monotonic() + self.GATHER_TIMEOUT
            with self._lock:
                while True:
                    now = time.monotonic()
                    held = [g.deadline for g in self._gathers if g.holds(now)]
                    left = min(until, max(held, default=now)) - now
                    if left <= 0:
                        break
                    self._lock.wait(left)
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        requests = [item for item in items if isinstance(item, Request)]
        return requests, any(item is _SHUTDOWN for item in items)

    def _serve(self) -> None:
        """Continuous batching: new requests join the running batch between steps.

        Requests take a slot once it fits and their prompt is fed in chunks (see
        ``_admit``). An error while admitting or feeding one request (out of memory
        included) reaches that caller only, and so does out of memory in a decode step
        (the newest row's); any other error in a decode step, or an unexpected one, ends
        the batch with that error for every caller in it.
        A warm-up asked for runs as soon as no batch runs. The worker
        goes on serving until it takes the shutdown marker; whenever it stops, every
        request it holds or that is still queued is answered.
        """
        batch: Batch | None = None
        pending = self._pending
        try:
            while True:
                idle = batch is None and not pending and not self._warm_up.wanted
                if idle:  # an idle engine's pool would slow every other thread's products
                    free_openmp_threads(self.device)
                requests, stopping = self._take_waiting(block=idle)
                pending.extend(requests)
                if stopping:
                    return
                if batch is None and self._warm_up.wanted:
                    self._warm_up.run(self.slot_model, self.loaded.lock)
                try:
                    batch = self._admit(batch)
                    if batch is not None:
                        self._step(batch)
                except BaseException as e:  # every caller in the batch must see it
                    for row in batch.holding if batch is not None else []:
                        row.request.send(e)
                    if batch is not None:
                        batch.release()
                    batch = None
                if batch is not None and not batch.holding:
                    batch = None
        finally:
            stopped = EngineStoppedError("The Baichuan2 engine was shut down")
            for row in batch.holding if batch is not None else []:
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
                self._warm_up.ended.set()

    def _admit(self, batch: Batch | None) -> Batch | None:
        """Give waiting requests slots, in order, while they fit; feed one chunk of prompts.

        A request whose slot does not fit waits; later ones that fit pass it, until it
        has been passed ``MAX_PASSES`` times: then those behind it wait too, until
        running rows end and it fits. One that fails to start gets its error; the
        others go on. Then ``_feed`` runs. Returns the batch, or None when it holds no
        row.
        """
        waiting: list[Request] = []
        blocked = False
        taken = list(self._pending)
        self._pending.clear()
        for request in taken:
            if request.cancelled.is_set():
                continue
            running = batch is not None and bool(batch.holding)
            if blocked or (running and not self.slot_model.cache.fits(request.reserved)):
                waiting.append(request)
                blocked = blocked or request.passed >= self.MAX_PASSES
                continue
            for passed in waiting:
                passed.passed += 1
            batch = self._start(batch, request)
        self._pending.extend(waiting)
        if batch is not None:
            self._feed(batch)
        return batch if batch is not None and batch.holding else None

    def _start(self, batch: Batch | None, request: Request) -> Batch | None:
        """Give ``request`` its slot (and cached prefix); a failure reaches only its caller."""
        try:
            row = self.budget.relieved(begin_row, self, request)
        except Exception as e:  # this caller must see it; the others go on
            request.send(self._admission_error(request, e))
            return batch
        if batch is None:
            batch = Batch(self)
        batch.prefilling.append(row)
        return batch

    def _feed(self, batch: Batch) -> None:
        """Feed at most ``prefill_chunk_tokens`` prompt tokens, oldest rows first.

        A row whose prompt is in joins the running rows; a cancelled one frees its
        slot; one that fails gets its error and frees its slot, and the others go on.
        """
        left = self.prefill_chunk_tokens or sys.maxsize
        for row in list(batch.prefilling):
            if left <= 0:
                return
            request = row.request
            try:
                if request.cancelled.is_set():
                    batch.prefilling.remove(row)
                    self.slot_model.cache.release(row.slot)
                    continue
                tokens = min(len(request.prompt_ids) - row.length, left)
                left -= tokens
                logits = self.budget.relieved(feed_prompt, self, row, tokens)
                if logits is not None:
                    batch.prefilling.remove(row)
                    batch.add(row, logits)
            except Exception as e:  # this caller must see it; the others go on
                if row in batch.prefilling:
                    batch.prefilling.remove(row)
                self.slot_model.cache.release(row.slot)
                request.send(self._admission_error(request, e))

    def _admission_error(self, request: Request, error: Exception) -> Exception:
        """What a request that failed to start is told (out of memory: the numbers)."""
        if not isinstance(error, torch.OutOfMemoryError):
            return error
        return out_of_memory_for_a_request(
            f"while starting this request (prompt of {len(request.prompt_ids)} tokens, "
            f"{request.reserved} positions of key/value cache reserved); the running "
            "requests go on",
            "Lower max_tokens, send fewer requests at once or give the engine a smaller "
            f"kv_cache_bytes (now {self.kv_cache_bytes}).",
            error,
        )

    def _step(self, batch: Batch) -> None:
        """Advance every running row by one token (see ``Batch.step``)."""
        batch.step()

    def _pick(self, logits: torch.Tensor, rows: list[Row], settings: RowSettings) -> torch.Tensor:
        """Each row's token and failure flags, ``[3, B]`` (see ``choose_tokens``)."""
        return choose_tokens(logits, settings)

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
            if isinstance(item, Request):
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


def engine_for(
    loaded: LoadedModel,
    compile: bool | None = None,
    kv_cache_bytes: int | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    prefix_cache_tokens: int = 0,
    prefill_chunk_tokens: int | None = None,
) -> NativeEngine:
    """Return the one engine serving ``loaded`` (created on first use, with these settings).

    An engine already running honours ``compile`` (the last one asked applies), a
    larger ``prefix_cache_tokens`` and ``prefill_chunk_tokens`` (None: leave it; the
    engine starts with ``DEFAULT_PREFILL_CHUNK_TOKENS``); a different
    ``kv_cache_bytes`` or ``max_rows`` cannot apply to it, so it warns
    (``UserWarning``) naming both values.
    """
    chunk = DEFAULT_PREFILL_CHUNK_TOKENS if prefill_chunk_tokens is None else prefill_chunk_tokens
    engine = loaded.shared(
        "engine",
        lambda: NativeEngine(loaded, compile, kv_cache_bytes, max_rows, prefix_cache_tokens, chunk),
    )
    engine.set_prefix_cache_tokens(prefix_cache_tokens)
    if prefill_chunk_tokens is not None:
        engine.set_prefill_chunk_tokens(prefill_chunk_tokens)
    asked = {"kv_cache_bytes": kv_cache_bytes, "max_rows": max_rows}
    running = {"kv_cache_bytes": engine.kv_cache_bytes, "max_rows": engine.max_rows}
    for name, value in asked.items():
        if value is not None and value != running[name]:
            msg = (
                f"{name}={value} is not applied: this model's engine already runs with "
                f"{name}={running[name]} (objects sharing a loaded model share its engine; "
                "unload() the model to start it with the new value)"
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
    if compile is not None:
        engine.set_compile(compile)
    return engine
