"""The running batch of the native engine: its rows, their text state, and one step.

A row is one request being decoded: its slot, its ids, its own restrictions (grammar,
processors, suppressed tokens) and its text (UTF-8 safe, stop strings held back). A
step picks every row's next token (``sampling.py``), sends each row's text, drops the
rows that ended and feeds the rest one token (``slot_model.py``). A row that fails
(NaN, a rejected token, an impossible mask) fails alone; so does the newest row when
a step runs out of memory. A new row takes its slot (``begin_row``) and its prompt is
fed in chunks (``feed_prompt``) before it joins the running rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from langchain_baichuan2.engines.base import GenerationChunk, OutputText
from langchain_baichuan2.engines.native.budget import out_of_memory_for_a_request
from langchain_baichuan2.engines.native.limits import PROCESSORS
from langchain_baichuan2.engines.native.sampling import RowSettings, apply_repetition_penalty
from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.engines.native.slots import doubled_capacity
from langchain_baichuan2.engines.settings import SamplingParams
from langchain_baichuan2.grammar import GrammarMask
from langchain_baichuan2.loading import LoadedModel
from langchain_baichuan2.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class EngineParts(Protocol):
    """What rows and batches use of the engine that runs them (``scheduler.NativeEngine``)."""

    loaded: LoadedModel
    tokenizer: Any
    device: torch.device
    vocab_size: int
    context_length: int
    eos_ids: set[int]
    eos_index: torch.Tensor
    slot_model: SlotModel
    prefix_cache: PrefixCache

    def _pick(self, logits: torch.Tensor, rows: list[Row], settings: RowSettings) -> torch.Tensor:
        """Choose each row's next token."""
        ...


class Request:
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
        self.passed = 0  # times a later request was admitted while this one waited
        self.cancelled = threading.Event()
        self.loop = loop
        self.outbox: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop is not None else queue.SimpleQueue()
        )

    def send(self, item: GenerationChunk | BaseException) -> None:
        """Hand the caller a chunk or an error (dropped if its event loop is gone)."""
        if self.loop is None:
            self.outbox.put_nowait(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self.cancelled.set()


class Row:
    """Decoding state of one request inside a running batch."""

    def __init__(self, request: Request, engine: EngineParts) -> None:
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
        # Its LoRA adapter's index (0: none); loaded when the request was checked.
        self.adapter = engine.slot_model.lora.index_of(params.adapter)
        # Keys/values depend on the adapter: only plain rows share prompts' caches.
        self.reuse_prefix = params.reuse_prefix and not self.adapter
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


def keep_for_reuse(engine: EngineParts, ids: list[int], slot: int) -> None:
    """Store the KV of ``ids`` (held in ``slot``) in the prefix cache, if memory allows.

    Reuse is an optimization: out of memory here costs the cache entry, not a request.
    """
    try:
        engine.prefix_cache.store(ids, engine.slot_model.read(slot, len(ids)))
    except torch.OutOfMemoryError:
        logger.warning("No memory to keep a prompt's key/value cache for reuse")


def begin_row(engine: EngineParts, request: Request) -> Row:
    """Give a request its slot and the keys/values of its longest cached prefix.

    The slot is sized for the request's whole life (``request.reserved``); the rest of
    the prompt is fed by ``feed_prompt``. If this fails, the slot is free again.
    """
    row = Row(request, engine)
    prompt = request.prompt_ids
    reused, prefix_kv = engine.prefix_cache.lookup(prompt) if row.reuse_prefix else (0, None)
    slots = engine.slot_model
    with engine.loaded.lock:
        row.slot = slots.acquire(request.reserved)
        try:
            if prefix_kv is not None:
                slots.write(row.slot, prefix_kv)
        except BaseException:
            slots.cache.release(row.slot)
            raise
    row.length = row.cached_tokens = reused
    return row


@torch.inference_mode()
def feed_prompt(engine: EngineParts, row: Row, tokens: int | None = None) -> torch.Tensor | None:
    """Prefill the next ``tokens`` of a row's prompt (None: all the rest) into its slot.

    Returns the last position's logits once the whole prompt is in (the row may then
    join the batch), else None. The caller frees the slot if this fails.
    """
    prompt = row.request.prompt_ids
    end = len(prompt) if tokens is None else min(len(prompt), row.length + tokens)
    slots = engine.slot_model
    with engine.loaded.lock:
        start = time.perf_counter()
        logits = slots.prefill(row.slot, prompt[row.length : end], row.length, row.adapter)
        if logits.device.type == "cuda":  # kernels run asynchronously: wait for them
            torch.cuda.synchronize(logits.device)
        row.prompt_seconds += time.perf_counter() - start
        if end == len(prompt) and row.reuse_prefix:
            keep_for_reuse(engine, prompt, row.slot)
    row.length = end
    if end < len(prompt):
        return None
    row.started = time.perf_counter()
    return logits


def _row_error(row: Row, excluded: int, overflowed: int) -> Exception | None:
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


class Batch:
    """The running rows, the device tensors describing them, and their next-token logits.

    Rows whose prompt is still being fed (``prefilling``, chunked prefill) hold their
    slots here too, and join the running rows once their prompt is in (``add``).

    Settings, slots and positions are tensors rebuilt only when a row joins, leaves or
    moves; a step advances positions and appends the new tokens to the seen ids in place.
    """

    def __init__(self, engine: EngineParts) -> None:
        self.engine = engine
        self.rows: list[Row] = []
        # Rows whose prompt is still being fed, chunk by chunk (their slots are taken).
        self.prefilling: list[Row] = []
        device = engine.device
        self.logits = torch.empty(0, engine.vocab_size, device=device)  # [B, V]
        # Every id each row has fed or picked (for the repetition penalty), padded with
        # the row's first id, which it has seen anyway: [B, capacity].
        self.seen_ids = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.adapters: torch.Tensor | None = None  # each row's adapter index (set by _describe)
        self._refresh()

    def _describe(
        self, rows: list[Row]
    ) -> tuple[RowSettings, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Settings, slot index, positions and seen counts of ``rows`` on the device.

        Also sets the rows' adapter indices (None when no row has an adapter).
        """
        engine = self.engine
        settings = RowSettings(
            [row.request.params for row in rows],
            [row.generator for row in rows],
            engine.vocab_size,
            engine.device,
        )
        described = (
            settings,
            torch.tensor([r.slot for r in rows], device=engine.device),
            torch.tensor([r.length for r in rows], device=engine.device),
            torch.tensor([len(r.ids) for r in rows], device=engine.device),
        )
        adapters = [r.adapter for r in rows]
        self.adapters = torch.tensor(adapters, device=engine.device) if any(adapters) else None
        return described

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

    def add(self, row: Row, logits: torch.Tensor) -> None:
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

    @property
    def holding(self) -> list[Row]:
        """Every row with a slot: the running rows, then those whose prompt is being fed."""
        return [*self.rows, *self.prefilling]

    def release(self) -> None:
        """Free every row's slot (the batch is over)."""
        for row in self.holding:
            self.engine.slot_model.cache.release(row.slot)
        self.rows, self.prefilling = [], []

    def _mask_row(self, row: Row, logits: torch.Tensor) -> None:
        """Apply a row's own restrictions (min_new_tokens, processors, grammar) in place."""
        if row.generated < row.min_new_tokens:
            logits[0, self.engine.eos_index] = -math.inf
        if row.suppressed is not None:
            logits[0, row.suppressed] = -math.inf
        if row.processors:
            ids = torch.tensor([row.ids], device=self.engine.device)
            for processor in row.processors:
                logits[:] = processor(ids, logits)
        if row.grammar is not None:
            row.grammar.apply(logits)

    @torch.inference_mode()
    def step(self) -> None:
        """Pick every row's next token, send the text, drop finished rows, advance.

        A row ends at eos, a stop string, ``max_new_tokens`` or the context length
        (``"length"``); a row whose logits hold NaN fails alone, and so does the newest
        row when the device runs out of memory (see ``_decode``). A batch without
        running rows does nothing.
        """
        engine, rows = self.engine, self.rows
        if not rows:
            return
        produced_nan = self.logits.isnan().any(dim=-1)
        logits = apply_repetition_penalty(self.logits, self.seen_ids, self.settings)
        failed: dict[int, Exception] = {}
        for i, row in enumerate(rows):
            if row.restricted or row.generated < row.min_new_tokens:
                try:
                    self._mask_row(row, logits[i : i + 1])
                except Exception as e:  # only this request fails; the batch goes on
                    failed[i] = e
                    logits[i] = 0.0  # a harmless row for the shared sampling below
        picked = engine._pick(logits, rows, self.settings)
        self.see(picked[0])
        # The step's one wait for the device.
        tokens, excluded, overflowed, nan = torch.cat([picked, produced_nan[None]]).tolist()
        keep = []
        cache = engine.slot_model.cache
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if nan[i]:
                cache.clear(row.slot)  # masked NaN keys would still poison the slot's next user
            if row.request.cancelled.is_set():
                continue
            if nan[i]:
                row.request.send(
                    FloatingPointError(
                        "the model produced NaN logits for this request, so it was stopped "
                        f"(dtype {engine.slot_model.dtype}; fp16 can overflow: try bfloat16 "
                        "or float32)"
                    )
                )
                continue
            error = failed.get(i) or _row_error(row, excluded[i], overflowed[i])
            if error is not None:
                row.request.send(error)
                continue
            if row.grammar is not None and not row.grammar.accept(token):
                row.request.send(RuntimeError(f"the grammar rejected token {token}"))
                continue
            row.ids.append(token)
            chunks = [row.text.push(token)]
            if row.text.finish_reason is None and len(row.ids) >= engine.context_length:
                chunks.append(row.text.finish("length"))
            for chunk in chunks:
                if chunk is not None and (chunk.text or chunk.token_ids):
                    row.request.send(chunk)
            if row.text.finish_reason is None:
                keep.append(i)
                continue
            if row.reuse_prefix:
                keep_for_reuse(engine, row.ids[: row.length], row.slot)
            row.request.send(row.summary())
        for i, row in enumerate(rows):
            if i not in keep:
                cache.release(row.slot)
        next_tokens = picked[0]
        if len(keep) < len(rows):
            self.keep(keep)
            next_tokens = next_tokens[keep]
            self._compact()
        self._decode(next_tokens)

    def _decode(self, tokens: torch.Tensor) -> None:
        """Feed every row its picked token (``tokens``, ``[B]``) and keep the new logits.

        Out of memory: the budget is relieved (the prefix cache emptied) and the step
        retried once; past that, the newest row fails with the numbers and frees its
        slot, and the step is retried without it, so the older rows go on.
        """
        slots = self.engine.slot_model
        relieved = False
        while self.rows:
            try:
                self.logits = self._run_decode(tokens)
            except torch.OutOfMemoryError as e:
                if not relieved and slots.cache.budget.relieve():
                    relieved = True
                    continue
                self._fail_newest(e)
                tokens = tokens[:-1]
                continue
            for row in self.rows:
                row.length += 1
            self.positions += 1
            return

    def _run_decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of the rows, keeping the prompts being fed intact.

        A step writes a dummy token at position 0 of every slot in its range that no
        row holds; a slot whose prompt is being fed holds real keys there, so they are
        saved before the step and put back after it.
        """
        slots = self.engine.slot_model
        with self.engine.loaded.lock:
            saved = [
                (row.slot, [(k.clone(), v.clone()) for k, v in slots.read(row.slot, 1)])
                for row in self.prefilling
                if row.length
            ]
            try:
                return slots.decode(
                    [row.slot for row in self.rows],
                    max(row.length for row in self.rows) + 1,
                    self.slot_index,
                    tokens,
                    self.positions,
                    self.adapters,
                )
            finally:
                for slot, kv in saved:
                    slots.write(slot, kv)

    def _fail_newest(self, error: torch.OutOfMemoryError) -> None:
        """Stop the newest row with an out-of-memory error that gives the numbers."""
        newest = self.rows[-1]
        cache = self.engine.slot_model.cache
        out_of_memory = out_of_memory_for_a_request(
            f"in a decode step of {len(self.rows)} rows (slot buffers of {cache.rows} x "
            f"{cache.length} positions, kv_cache_bytes={cache.budget.max_bytes}); this "
            f"request, the newest, was stopped after {newest.generated} tokens so the other "
            f"{len(self.rows) - 1} go on",
            "Lower max_rows or kv_cache_bytes, or send fewer requests at once.",
            error,
        )
        newest.request.send(out_of_memory)
        cache.release(newest.slot)
        self.keep(list(range(len(self.rows) - 1)))

    def _compact(self) -> None:
        """Move rows down into freed slots when that shrinks the step's row bucket.

        A step covers slots up to the highest taken one (rounded up to a power of two):
        after rows end, the rows above the bucket their count needs move down (one
        copy of each moved row's keys/values, never on an ordinary step).
        """
        bucket = doubled_capacity(len(self.rows))
        movers = [row for row in self.rows if row.slot >= bucket]
        if not movers:
            return
        engine = self.engine
        with engine.loaded.lock:
            for row in movers:
                row.slot = engine.slot_model.cache.move_down(row.slot, row.length)
        self.refresh_slots()
