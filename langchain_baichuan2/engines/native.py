"""The native engine: our model in this process, a worker thread, a batched decode loop.

Requests (prompt ids + sampling settings) are queued. The worker prefills each new
request (reusing the KV cache of a stored prefix when one matches) and adds it to the
running batch between decode steps (continuous batching); the batch then advances one
token for every row at a time. Each request keeps its own sampling settings, stop
strings and grammar, gets its own text deltas (UTF-8 safe, stop strings held back),
finish reason, token counts and timings, and can be cancelled between steps. An error
in a prefill reaches that caller, one in a decode step every caller of the batch; the
worker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from langchain_baichuan2.engines.base import (
    Engine,
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
from langchain_baichuan2.grammar import GrammarCompiler, GrammarMask
from langchain_baichuan2.loading import LoadedModel
from langchain_baichuan2.prefix_cache import LayerKV, PrefixCache

# Extra generate() arguments the engine applies, each as transformers' own processor,
# built from (value, prompt length, eos ids, device): tensors they keep must live where
# the logits are.
EXTRA_ARGUMENTS: dict[str, Callable[[Any, int, set[int], str], LogitsProcessor]] = {
    "min_new_tokens": lambda v, prompt_len, eos, device: MinNewTokensLengthLogitsProcessor(
        prompt_len, int(v), sorted(eos), device=device
    ),
    "no_repeat_ngram_size": lambda v, prompt_len, eos, device: NoRepeatNGramLogitsProcessor(int(v)),
    "suppress_tokens": lambda v, prompt_len, eos, device: SuppressTokensLogitsProcessor(
        list(v), device=device
    ),
    "bad_words_ids": lambda v, prompt_len, eos, device: NoBadWordsLogitsProcessor(
        [list(w) for w in v], sorted(eos)
    ),
}


def check_extra_arguments(extra: Sequence[tuple[str, Any]]) -> None:
    """Reject ``generate()`` arguments the native engine does not apply."""
    reject_unsupported_arguments(extra, list(EXTRA_ARGUMENTS), "native")


# Put in an engine's inbox to stop its worker.
_SHUTDOWN = object()


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
        grammar: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
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
        self.processors = [
            EXTRA_ARGUMENTS[name](
                value, len(request.prompt_ids), engine.eos_ids, str(engine.device)
            )
            for name, value in params.extra
        ]
        self.grammar = (
            GrammarMask(request.grammar, engine.vocab_size) if request.grammar is not None else None
        )

    def summary(self) -> GenerationChunk:
        """The final chunk: finish reason, measured counts and timings."""
        return self.text.summary(
            len(self.request.prompt_ids), self.cached_tokens, self.prompt_seconds, self.started
        )


def _dynamic_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers (all dynamic full-attention layers for Baichuan2)."""
    return cast(list[DynamicLayer], cache.layers)


def layer_kv(cache: DynamicCache) -> LayerKV:
    """Per-layer (keys, values) held by ``cache``."""
    return [(layer.keys, layer.values) for layer in _dynamic_layers(cache)]  # type: ignore[misc]


class _Batch:
    """The running batch: rows, their shared KV cache and the next-token logits.

    Every row's tokens sit right-aligned in the cache (``mask`` marks them), so rows
    of any length can join by left-padding, and positions (RoPE: ``cumsum(mask)``;
    ALiBi: relative distances) are unaffected by the padding.
    """

    def __init__(
        self, row: _Row, ids: torch.Tensor, cache: DynamicCache, logits: torch.Tensor
    ) -> None:
        self.rows = [row]
        self.ids = ids  # [B, L] every token in the cache (pad id where masked)
        self.mask = torch.ones_like(ids)  # [B, L]
        self.cache = cache  # per layer keys/values [B, H, L, D]
        self.logits = logits  # [B, V] scores for each row's next token

    @property
    def kv(self) -> LayerKV:
        """Per-layer (keys, values) of the whole batch."""
        return layer_kv(self.cache)

    @kv.setter
    def kv(self, kv: LayerKV) -> None:
        for layer, (k, v) in zip(_dynamic_layers(self.cache), kv, strict=True):
            layer.keys, layer.values = k, v

    def add(self, row: _Row, ids: torch.Tensor, cache: DynamicCache, logits: torch.Tensor) -> None:
        """Join a prefilled row, left-padding whichever side is shorter."""
        kv = layer_kv(cache)
        length = max(self.ids.shape[1], ids.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        new_mask = torch.ones_like(ids)
        self.ids = torch.cat([pad(self.ids, 1), pad(ids, 1)])
        self.mask = torch.cat([pad(self.mask, 1), pad(new_mask, 1)])
        self.kv = [
            (torch.cat([pad(k, 2), pad(nk, 2)]), torch.cat([pad(v, 2), pad(nv, 2)]))
            for (k, v), (nk, nv) in zip(self.kv, kv, strict=True)
        ]
        self.logits = torch.cat([self.logits, logits])
        self.rows.append(row)

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at ``index``, then trim columns no row uses."""
        select = torch.tensor(index, dtype=torch.long, device=self.ids.device)
        self.rows = [self.rows[i] for i in index]
        self.ids, self.mask, self.logits = self.ids[select], self.mask[select], self.logits[select]
        first = int(self.mask.any(dim=0).long().argmax())
        self.ids, self.mask = self.ids[:, first:], self.mask[:, first:]
        self.kv = [(k[select, :, first:], v[select, :, first:]) for k, v in self.kv]

    def row_kv(self, i: int) -> tuple[list[int], LayerKV]:
        """Row ``i``'s ids and keys/values without padding."""
        real = int(self.mask[i].sum())
        ids = self.ids[i, -real:].tolist()
        return ids, [(k[i : i + 1, :, -real:], v[i : i + 1, :, -real:]) for k, v in self.kv]


def _apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Penalize logits of tokens already in each row (CTRL rule, as transformers does)."""
    if bool((penalty == 1.0).all()):
        return logits
    # Which vocabulary entries each row has seen; amax makes a padding slot (id 0, not
    # seen) and a real id 0 in the same row agree, whatever order scatter runs in.
    present = torch.zeros_like(logits, dtype=torch.int8).scatter_reduce(
        1, seen, seen_mask.to(torch.int8), reduce="amax"
    )
    factor = penalty[:, None]
    penalized = torch.where(logits > 0, logits / factor, logits * factor)
    return torch.where(present.bool(), penalized, logits)


def _filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p) sets with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    remove = rank >= k
    probs = sorted_logits.masked_fill(remove, -math.inf).softmax(dim=-1)
    # Drop a token once the mass before it already reaches top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(remove, -math.inf))


class NativeEngine(Engine):
    """Runs generation for one loaded model on a background worker thread.

    Args:
        loaded: The model, tokenizer and generation defaults to serve.
    """

    # How long the worker waits for the rest of an announced group (see ``gather``).
    GATHER_TIMEOUT = 1.0
    # How often a waiting caller checks that the worker is still alive.
    POLL_SECONDS = 1.0

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.context_length = self.model.config.model_max_length
        self.device = next(self.model.parameters()).device
        self.eos_ids = eos_ids_of(loaded.generation_config)
        self.vocab_size = self.model.config.vocab_size
        self._inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Condition()
        self._gathers: list[_Gather] = []
        self._closed = False
        self.prefix_cache = PrefixCache()

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
        if not prompt_ids:
            raise ValueError("The prompt is empty: there is nothing to generate from")
        request = _Request(prompt_ids, params, grammar, loop)
        with self._lock:
            if self._closed:
                raise RuntimeError("The Baichuan2 engine was shut down")
            if self._worker is None:
                self._start_worker()
            self._inbox.put(request)
            group = _current_gather.get()
            if group is not None:
                group.remaining -= 1
            self._lock.notify_all()
        return request

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
                item = RuntimeError("The Baichuan2 engine's worker stopped unexpectedly")
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
        requests = [item for item in items if item is not _SHUTDOWN]
        return requests, len(requests) < len(items)

    def _serve(self) -> None:
        """Continuous batching: new requests join the running batch between steps.

        An error in one request's prefill reaches that caller; an error in a decode
        step, or an unexpected one (say, out of memory while joining the batch), ends
        the batch with that error for every caller in it. The worker goes on serving
        until it takes the shutdown marker; whenever it stops, every request it holds
        or that is still queued is answered.
        """
        batch: _Batch | None = None
        try:
            while True:
                requests, stopping = self._take_waiting(block=batch is None)
                if stopping:
                    for request in requests:
                        request.send(RuntimeError("The Baichuan2 engine was shut down"))
                    return
                try:
                    for request in requests:
                        if request.cancelled.is_set():
                            continue
                        try:
                            row, ids, cache, logits = self._prefill(request)
                        except Exception as e:  # this caller must see it; the others go on
                            request.send(e)
                            continue
                        if batch is None:
                            batch = _Batch(row, ids, cache, logits)
                        else:
                            batch.add(row, ids, cache, logits)
                    if batch is not None:
                        self._step(batch)
                except BaseException as e:  # every caller in the batch must see it
                    for row in batch.rows if batch is not None else []:
                        row.request.send(e)
                    for request in requests:
                        request.send(e)
                    batch = None
                if batch is not None and not batch.rows:
                    batch = None
        finally:
            stopped = RuntimeError("The Baichuan2 engine was shut down")
            for row in batch.rows if batch is not None else []:
                row.request.send(stopped)
            with self._lock:
                closed = self._closed
                if not closed:  # an unexpected exit: a new worker serves what is queued
                    self._start_worker()
            if closed:
                self._answer_queued(stopped)

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
        self._answer_queued(RuntimeError("The Baichuan2 engine was shut down"))

    def _kv_cache(self, kv: LayerKV | None) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in enumerate(kv or []):
            cache.update(k, v, layer)
        return cache

    @torch.inference_mode()
    def _prefill(self, request: _Request) -> tuple[_Row, torch.Tensor, DynamicCache, torch.Tensor]:
        """Run one prompt (reusing a cached prefix); return its row, ids, cache, logits."""
        row = _Row(request, self)
        prompt = request.prompt_ids
        reuse = request.params.reuse_prefix
        reused, prefix_kv = self.prefix_cache.lookup(prompt) if reuse else (0, None)
        ids = torch.tensor([prompt], device=self.device)
        cache = self._kv_cache(prefix_kv)
        with self.loaded.lock:
            start = time.perf_counter()
            logits = (
                self.model(
                    input_ids=ids[:, reused:],
                    attention_mask=torch.ones_like(ids),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .float()
            )
            if logits.device.type == "cuda":  # kernels run asynchronously: wait for them
                torch.cuda.synchronize(logits.device)
            row.prompt_seconds = time.perf_counter() - start
        if reuse:
            self.prefix_cache.store(prompt, layer_kv(cache))
        row.cached_tokens = reused
        row.started = time.perf_counter()
        return row, ids, cache, logits

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        """Pick every row's next token, send the text, drop finished rows, advance."""
        rows = batch.rows

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        params = [r.request.params for r in rows]
        temperature = column([p.temperature for p in params])
        logits = _apply_repetition_penalty(
            batch.logits,
            batch.ids,
            batch.mask.bool(),
            column([p.repetition_penalty for p in params]),
        )
        failed: dict[int, Exception] = {}
        for i, row in enumerate(rows):
            try:
                for processor in row.processors:
                    seen = batch.ids[i : i + 1, batch.mask[i].bool()]
                    logits[i : i + 1] = processor(seen, logits[i : i + 1])
                if row.grammar is not None:
                    row.grammar.apply(logits[i : i + 1])
                if not bool(torch.isfinite(logits[i]).any()):
                    raise ValueError(
                        "every token is excluded (by the grammar and the generation "
                        "arguments together): nothing can be generated"
                    )
            except Exception as e:  # only this request fails; the batch goes on
                failed[i] = e
                logits[i] = 0.0  # a harmless row for the shared sampling below
        tokens = self._pick(
            logits,
            rows,
            temperature,
            column([p.top_k for p in params], torch.long),
            column([p.top_p for p in params]),
            failed,
        )
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if row.request.cancelled.is_set():
                continue
            if i in failed:
                row.request.send(failed[i])
                continue
            if row.grammar is not None and not row.grammar.accept(token):
                row.request.send(RuntimeError(f"the grammar rejected token {token}"))
                continue
            chunk = row.text.push(token)
            if chunk is not None and (chunk.text or chunk.token_ids):
                row.request.send(chunk)
            if row.text.finish_reason is None:
                keep.append(i)
                continue
            if row.request.params.reuse_prefix:
                self.prefix_cache.store(*batch.row_kv(i))
            row.request.send(row.summary())
        if len(keep) < len(rows):
            batch.keep(keep)
            tokens = tokens[keep]
        if not batch.rows:
            return
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        with self.loaded.lock:
            batch.logits = (
                self.model(
                    input_ids=tokens[:, None],
                    attention_mask=batch.mask,
                    cache=batch.cache,
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )
        batch.ids = torch.cat([batch.ids, tokens[:, None]], dim=1)

    def _pick(
        self,
        logits: torch.Tensor,
        rows: list[_Row],
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        failed: dict[int, Exception],
    ) -> torch.Tensor:
        """Choose each row's next token: argmax for greedy rows, else sample.

        Every operation is row-wise, so one row's extreme values (a temperature of
        1e-45 overflowing its logits) can only spoil that row, which then goes into
        ``failed`` instead of failing the batch.
        """
        tokens = logits.argmax(dim=-1)
        sampled = temperature > 0
        if not bool(sampled.any()):
            return tokens
        warped = logits / torch.where(sampled, temperature, 1.0)[:, None]
        probs = _filter_top_k_top_p(warped, top_k, top_p).softmax(dim=-1)
        for i, row in enumerate(rows):
            if not sampled[i] or i in failed:
                continue
            if not bool(torch.isfinite(probs[i]).all()):
                params = row.request.params
                failed[i] = ValueError(
                    f"temperature={params.temperature} with repetition_penalty="
                    f"{params.repetition_penalty} overflows the logits of this request: "
                    "no valid probabilities to sample from"
                )
                continue
            tokens[i] = torch.multinomial(probs[i], 1, generator=row.generator)[0]
        return tokens


def engine_for(loaded: LoadedModel) -> NativeEngine:
    """Return the one engine serving ``loaded`` (created on first use)."""
    return loaded.shared("engine", lambda: NativeEngine(loaded))
