"""Baichuan2's forward pass over the slot cache: the native engine's fast path.

``SlotModel`` runs the loaded model's own modules (so quantized layers work unchanged)
on keys/values kept in a ``SlotCache``. Prefill feeds one sequence's new tokens; a
decode step feeds one token for every running sequence. Positions are tensors, so a
step needs nothing from the host: RoPE angles come from a precomputed table, the ALiBi
bias is built from positions and the cached slopes, and every row sees only its own
keys up to its position (``key index <= position``). The decode step can be compiled
with ``torch.compile``: then it runs on a GPU as CUDA graphs. Its shape is a bucket:
rows ``[:R]`` with R the highest taken slot rounded up to a power of two, keys ``[:L]``
with L the longest row rounded up to 256 times a power of two, so a step costs what
its rows need, not what the buffers hold. The rows, keys and buffer length are dynamic
dimensions, so one graph serves every bucket of a ``step_class`` (a GPU still records
one CUDA graph per bucket, on its first use). ``prepare_warm_up`` fixes the buffers'
storage; ``compile_steps`` then compiles every class on private inputs, off the request
path: until a class is ready, its steps run uncompiled. A bucket whose compiled step
runs out of memory runs uncompiled from then on.

LoRA adapters (``add_adapter``): each row has an adapter index (0: none); a step whose
rows all have none runs exactly the plain path, otherwise each targeted linear adds
every row's own delta (``modeling.lora.LoraRows``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from langchain_baichuan2.engines.native.cpu_layout import HeadProjection, lay_out
from langchain_baichuan2.engines.native.slots import SlotCache, doubled_capacity
from langchain_baichuan2.modeling import BaichuanForCausalLM
from langchain_baichuan2.modeling.lora import Adapter, LoraRows, LoraStack
from langchain_baichuan2.modeling.modeling import alibi_bias, alibi_slopes
from langchain_baichuan2.prefix_cache import LayerKV

logger = logging.getLogger(__name__)

# Keys are attended in blocks of this many positions (uncompiled decode), so the
# attention reads what the longest row needs, not the whole buffer.
KEY_BLOCK = 64
# The compiled step's key lengths: this many positions times a power of two.
SHORTEST_COMPILED_KEYS = 256


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def row_bucket(highest_slot: int, rows: int) -> int:
    """Rows a compiled step covers: ``highest_slot + 1`` up to a power of two, within ``rows``."""
    return min(doubled_capacity(highest_slot + 1), rows)


def key_bucket(longest: int, length: int) -> int:
    """Keys a compiled step attends: ``longest`` up to 256 x a power of two, within ``length``."""
    return min(doubled_capacity(longest, SHORTEST_COMPILED_KEYS), length)


def step_class(rows: int, keys: int, length: int, lora: bool = False) -> tuple[bool, ...]:
    """What the compiled step's graph depends on besides dynamic sizes.

    Dynamo specializes one row (sizes 0 and 1 are never dynamic) and keys viewing the
    whole buffer length (a contiguous view); everything else shares one graph
    (``benchmarks/bench_warmup.py`` counts them).
    """
    return rows == 1, keys == length, lora


def _mark_dynamic(arguments: Sequence[Any]) -> None:
    """Compile the step's rows, keys and buffer length as dynamic sizes."""
    ids, positions, keys, values, cos, sin = arguments[:6]
    for tensor in (ids, positions):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    for tensor in (*keys, *values):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(tensor, 2)
    for tensor in (cos, sin):
        if tensor.shape[0]:  # ALiBi passes empty tables
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def _layer_device(layer: nn.Module, default: torch.device) -> torch.device:
    """Where a decoder layer computes (accelerate's hook says so for offloaded layers)."""
    hook_device = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    device = next(layer.parameters()).device
    return default if device.type == "meta" else device


class SlotModel:
    """The model's forward pass on a slot cache.

    A model split over several devices (``device_map``) keeps each layer's keys/values
    on that layer's device, and the hidden states follow the layers.

    Args:
        model: The loaded Baichuan2 model.
        compile: Compile the decode step with ``torch.compile`` (falls back to the
            uncompiled step, with a warning, if compiling fails).
        max_length: Most positions a sequence may hold (the model's context).
        max_bytes: Most bytes the key/value buffers (and stored prefixes) may take.
        max_rows: Most sequences the buffers may hold at once.
    """

    def __init__(
        self,
        model: BaichuanForCausalLM,
        compile: bool = False,
        *,
        max_length: int | None = None,
        max_bytes: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.model = model
        config = model.config
        embed = model.model.embed_tokens.weight
        self.dtype = embed.dtype
        self.device = embed.device
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        devices = [_layer_device(layer, self.device) for layer in model.model.layers]
        self.cache = SlotCache(
            devices,
            self.heads,
            self.head_dim,
            self.dtype,
            max_length=max_length,
            max_bytes=max_bytes,
            max_rows=max_rows,
        )
        self.lora = LoraStack(devices)
        self.rotary = model.model.rotary_emb  # None for ALiBi
        self.slopes = alibi_slopes(self.heads).to(self.device)
        self.head = HeadProjection(model.lm_head)
        self._laid_out = False
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        self.compile = compile
        self.compile_failed = False  # set once compiling failed: never tried again
        self.lora_compile_failed = False  # the same, for steps with adapters
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.compiled_classes: set[tuple[bool, ...]] = set()  # see ``step_class``
        self.eager_buckets: set[tuple[int, int]] = set()  # (rows, keys) out of memory
        self._views: dict[tuple[int, int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.compile_seconds = 0.0  # spent compiling so far (first call of each class)
        self.warmup_seconds: float | None = None  # set by ``compile_steps``
        self.warmup_progress = (0, 0)  # classes compiled by ``compile_steps``, of how many
        self._warming = False  # ``compile_steps`` runs: classes not yet ready run uncompiled

    # -- position encodings ---------------------------------------------------------

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position the buffers hold, from the model's own rotary module."""
        if self._cos.shape[0] != self.cache.length:
            self._cos, self._sin = self._rope_for(self.cache.length)
        return self._cos, self._sin

    @torch.inference_mode(False)  # normal tensors, as the slots are (see ``_dummy_step``)
    def _rope_for(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables of positions ``0..length-1`` (empty for ALiBi)."""
        if self.rotary is None:
            return self._cos, self._sin
        positions = torch.arange(length, device=self.device)[None]
        cos, sin = self.rotary(self._cos, positions)  # in the dtype of its first argument
        return cos[0], sin[0]

    def _mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """What each query may attend: keys at or before its position.

        RoPE: a boolean ``[B, 1, T, L]``. ALiBi: the additive bias ``m_h * (j - i)``
        with the dtype's minimum above the diagonal, ``[B, H, T, L]``.
        """
        distance = torch.arange(length, device=positions.device) - positions[:, :, None]
        if self.rotary is not None:
            return (distance <= 0)[:, None]  # [B, T, L] -> [B, 1, T, L]
        return alibi_bias(distance, self.slopes, self.dtype)

    # -- the forward pass ---------------------------------------------------------------

    def _hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        cos_table: torch.Tensor,
        sin_table: torch.Tensor,
        lora: LoraRows | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` of ``ids`` at ``positions`` (both ``[B, T]``).

        ``keys``/``values`` are per-layer views ``[B, heads, L, D]`` of the rows' slots;
        the new tokens' keys/values are written into them at their positions first.
        ``lora``: the rows' adapters (None: the plain model).
        """
        inner = self.model.model
        batch, seq = ids.shape
        hidden = inner.embed_tokens(ids)
        mask = self._mask(positions, keys[0].shape[2])
        rows = torch.arange(batch, device=ids.device)[:, None].expand(batch, seq)
        rope = self.rotary is not None
        # ALiBi: the (empty) tables travel along unused.
        cos, sin = (cos_table[positions], sin_table[positions]) if rope else (cos_table, sin_table)
        for number, (layer, layer_keys, layer_values) in enumerate(
            zip(inner.layers, keys, values, strict=True)
        ):
            if hidden.device != layer_keys.device:  # the next device of a split model
                device = layer_keys.device
                hidden, mask, rows, positions, cos, sin = (
                    t.to(device) for t in (hidden, mask, rows, positions, cos, sin)
                )
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            qkv = attention.W_pack(normed)
            if lora is not None:
                qkv = lora.add(qkv, normed, number, "W_pack")
            qkv = qkv.view(batch, seq, 3, self.heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, T, D]
            if rope:
                query, key = apply_rotary_pos_emb(query, key, cos, sin)
            layer_keys[rows, :, positions] = key.transpose(1, 2)
            layer_values[rows, :, positions] = value.transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                query, layer_keys, layer_values, attn_mask=mask, scale=attention.scaling
            )
            attended = attended.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
            if lora is None:
                hidden = hidden + attention.o_proj(attended)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
                continue
            hidden = hidden + lora.linear(attention.o_proj, attended, number, "o_proj")
            hidden = hidden + lora.mlp(layer.mlp, layer.post_attention_layernorm(hidden), number)
        return inner.norm(hidden)

    def add_adapter(self, adapter: Adapter) -> int:
        """Serve ``adapter`` from now on (once); return its index for ``prefill``/``decode``.

        The caller holds the model's lock (steps read the stacked weights).
        """
        config = self.model.config
        h, i = config.hidden_size, config.intermediate_size
        shapes = {
            "W_pack": (3 * h, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }
        index = self.lora.add(adapter, shapes)
        if self.device.type == "cuda":  # CUDA graphs read them in place, never copied
            stacked = [t for pair in self.lora.stacks.values() for t in pair]
            for tensor in [*stacked, *self.lora.scales]:
                torch._dynamo.mark_static_address(tensor)
        return index

    def prefill(self, slot: int, ids: Sequence[int], start: int, adapter: int = 0) -> torch.Tensor:
        """Feed ``ids`` at positions ``start..``; return fp32 logits ``[1, V]`` of the last.

        Positions ``0..start-1`` of the slot must already hold the prefix's keys/values.
        ``adapter``: the row's adapter index (0: none).
        The first prefill lays the weights out for the CPU (``cpu_layout.lay_out``).
        """
        self._lay_out()
        end = start + len(ids)
        self._reserve(slot + 1, end)
        cos, sin = self._rope_tables()
        ids_tensor = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        keys = [k[slot : slot + 1, :, :end] for k in self.cache.keys]
        values = [v[slot : slot + 1, :, :end] for v in self.cache.values]
        lora = self.lora.rows(adapter)
        hidden = self._hidden(ids_tensor, positions, keys, values, cos, sin, lora)
        return self.head(hidden[:, -1]).float().to(self.device)

    def decode(
        self,
        slots: Sequence[int],
        longest: int,
        slot_index: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed one token per running sequence; return fp32 logits ``[B, V]``.

        Args:
            slots: The rows' slots, in batch order.
            longest: The largest position among the rows, plus one.
            slot_index: ``slots`` as a tensor on the model's device.
            tokens: Each row's new token, ``[B]``.
            positions: Each row's position for it (tokens already in its slot), ``[B]``.
            adapters: Each row's adapter index, ``[B]``; None when no row has one.
        """
        self._reserve(max(slots) + 1, longest)
        cos, sin = self._rope_tables()
        high = row_bucket(max(slots), self.cache.rows)
        bucket = (high, key_bucket(longest, self.cache.length))
        compiled = self._runs_compiled(bucket, adapters is not None)
        if compiled:
            low = 0
            keys, values = self._static_views(*bucket)
        else:
            low, high = min(slots), max(slots) + 1
            length = min(_round_up(longest, KEY_BLOCK), self.cache.length)
            keys = [k[low:high, :, :length] for k in self.cache.keys]
            values = [v[low:high, :, :length] for v in self.cache.values]
        local = slot_index - low
        width = high - low
        ids = tokens.new_zeros(width, 1).index_copy_(0, local, tokens[:, None])
        where = positions.new_zeros(width, 1).index_copy_(0, local, positions[:, None])
        lora = None
        if adapters is not None:
            index = adapters.new_zeros(width).index_copy_(0, local, adapters)
            lora = self.lora.rows(index)
        arguments = (ids, where, keys, values, cos, sin, lora)
        hidden = self._compiled_step(bucket, *arguments) if compiled else None
        if hidden is None:
            hidden = self._last_hidden(*arguments)
        return self.head(hidden[local.to(hidden.device)]).float().to(self.device)

    def _last_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        lora: LoraRows | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[width, H]`` of a one-token step (the part that is compiled)."""
        return self._hidden(ids, positions, keys, values, cos, sin, lora)[:, 0]

    def _static_views(
        self, rows: int, length: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``[:rows, :, :length]`` of every buffer, the same tensor objects on every step.

        Compiled graphs (CUDA graphs in particular) need their inputs at fixed addresses:
        the views (which all start where their buffer starts) are marked static and kept
        until the buffers are reallocated.
        """
        key = (rows, length, self.cache.generation)
        if key not in self._views:
            views = (
                [k[:rows, :, :length] for k in self.cache.keys],
                [v[:rows, :, :length] for v in self.cache.values],
            )
            for view in (*views[0], *views[1], *self._rope_tables()):
                torch._dynamo.mark_static_address(view)
            self._views[key] = views
        return self._views[key]

    def _runs_compiled(self, bucket: tuple[int, int], lora: bool) -> bool:
        """Whether a step of ``bucket`` runs compiled (compiling it if it may, inline)."""
        # Read once (set elsewhere); a step with adapters compiles unless that failed.
        if not self.compile or self.compile_failed or (lora and self.lora_compile_failed):
            return False
        if bucket in self.eager_buckets:
            return False
        # While compile_steps runs, only classes it has compiled are used.
        ready = step_class(*bucket, self.cache.length, lora) in self.compiled_classes
        return ready or not self._warming

    def _compiled_step(
        self, bucket: tuple[int, int] | None, *arguments: Any
    ) -> torch.Tensor | None:
        """Run the compiled step, compiling it on first use of each class (timed, logged).

        Returns None when the step must run uncompiled: compiling failed (logged once;
        the uncompiled step takes over), or ``bucket`` ran out of memory (logged once;
        that bucket runs uncompiled from then on). ``bucket``: None for ``compile_steps``.
        """
        try:
            return self._run_compiled(*arguments)
        except torch.OutOfMemoryError as e:
            if bucket is None:
                logger.warning("Out of memory while compiling the Baichuan2 decode step (%s)", e)
            else:
                self.eager_buckets.add(bucket)
                logger.warning(
                    "Out of memory while compiling or recording the Baichuan2 decode step "
                    "for %d rows x %d keys; that shape runs uncompiled from now on (%s)",
                    *bucket,
                    e,
                )
            return None
        except Exception as e:  # a compiler that cannot handle this model or machine
            with_adapters = arguments[-1] is not None
            logger.warning(
                "torch.compile failed (%s: %s); the Baichuan2 engine goes on uncompiled%s",
                type(e).__name__,
                e,
                " for steps with LoRA adapters" if with_adapters else "",
            )
            if with_adapters:
                self.lora_compile_failed = True
            else:
                self.compile_failed = True
            return None

    def _run_compiled(self, *arguments: Any) -> torch.Tensor:
        if self._compiled is None:
            _allow_graphs(64)  # one per step class, with room to spare
            cuda = self.device.type == "cuda"
            self._compiled = torch.compile(
                self._last_hidden, dynamic=None, mode="reduce-overhead" if cuda else None
            )
        view = arguments[2][0]  # [rows, heads, keys, head_dim] of a longer buffer
        buffer_length = view.stride(1) // self.head_dim
        kind = step_class(view.shape[0], view.shape[2], buffer_length, arguments[-1] is not None)
        _mark_dynamic(arguments)
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        hidden = self._compiled(*arguments)
        if kind not in self.compiled_classes:
            self._log_compile(started, kind)
            self.compiled_classes.add(kind)
        return hidden

    def _lay_out(self) -> None:
        """Lay the weights out for the CPU once (``cpu_layout.lay_out``).

        Here, not when built: the caller holds the model's lock.
        """
        if not self._laid_out:
            lay_out(self.model)
            self._laid_out = True

    def prepare_warm_up(self) -> None:
        """Fix the buffers' storage (see ``SlotCache.fix``) and lay the weights out.

        The caller holds the model's lock; no slot may be taken. When compiling, the
        caller then runs ``compile_steps``.
        """
        self._lay_out()
        self.cache.fix()
        self._forget_stale_views()
        # From now until compile_steps ends, classes not yet compiled run uncompiled.
        self._warming = self.compile and not self.compile_failed

    def warm_up_shapes(self) -> list[tuple[int, int, int]]:
        """One (rows, keys, buffer length) of every step class ``compile_steps`` compiles."""
        keys = SHORTEST_COMPILED_KEYS
        rows = [1, 2] if (self.cache.budget.max_rows or 2) > 1 else [1]
        return [(r, keys, length) for r in rows for length in (2 * keys, keys)]

    @torch.inference_mode()
    def compile_steps(self) -> None:
        """Compile every step class on private inputs, off the request path; never raises.

        Meant for a background thread, without the model's lock: each class runs on its
        own small buffers (never the slots), while the worker runs steps uncompiled
        until their class is ready. Logs each class and the total (``warmup_seconds``);
        ``warmup_progress`` counts the classes compiled (one that failed is not).
        """
        started = time.perf_counter()
        shapes = self.warm_up_shapes()
        self.warmup_progress = (0, len(shapes))
        self._warming = True
        try:
            for rows, keys, length in shapes:
                if not self.compile or self.compile_failed:
                    break
                if self._compiled_step(None, *self._dummy_step(rows, keys, length)) is not None:
                    self.warmup_progress = (self.warmup_progress[0] + 1, len(shapes))
        except Exception:  # serving goes on uncompiled, compiling on first use
            logger.exception("Compiling the Baichuan2 decode step in the background failed")
        finally:
            self._warming = False
        self.warmup_seconds = time.perf_counter() - started
        logger.info(
            "Warmed up the Baichuan2 decode step: %d of %d step classes compiled in %.1f s",
            *self.warmup_progress,
            self.warmup_seconds,
        )

    def _dummy_step(self, rows: int, keys: int, length: int) -> tuple[Any, ...]:
        """Arguments of a step of ``rows`` x ``keys`` on new buffers of ``length`` positions.

        Made as a real step's are, or the compiled graph's guards would not match them:
        ids and positions in inference mode, buffers as views of a flat storage (see
        ``SlotCache``), made outside it.
        """
        ids, positions = (torch.zeros(rows, 1, dtype=torch.long, device=self.device) for _ in "ip")
        buffers = [self.cache.scratch(rows, length) for _ in "kv"]
        views = [[b[:, :, :keys] for b in kind] for kind in buffers]
        cos, sin = self._rope_for(length)
        for view in (*views[0], *views[1], cos, sin):
            torch._dynamo.mark_static_address(view)  # as the slots' views are
        return ids, positions, views[0], views[1], cos, sin, None

    def acquire(self, length: int) -> int:
        """Take a free slot that holds ``length`` positions (growing the buffers)."""
        slot = self.cache.acquire(length)
        self._forget_stale_views()
        return slot

    def _reserve(self, rows: int, length: int) -> None:
        self.cache.reserve(rows, length)
        self._forget_stale_views()

    def _forget_stale_views(self) -> None:
        """Drop views of buffers the cache has replaced, so their memory is freed."""
        if any(key[-1] != self.cache.generation for key in self._views):
            self._views = {}

    def write(self, slot: int, kv: LayerKV) -> None:
        """Put a stored prefix's keys/values at the start of ``slot``."""
        self._reserve(slot + 1, kv[0][0].shape[2] if kv else 0)
        self.cache.write(slot, kv)

    def read(self, slot: int, length: int) -> LayerKV:
        """Views of the first ``length`` positions of ``slot``'s keys/values."""
        return self.cache.read(slot, length)

    def _log_compile(self, started: float, kind: tuple[bool, ...]) -> None:
        seconds = time.perf_counter() - started
        self.compile_seconds += seconds
        one_row, whole, lora = kind
        logger.info(
            "Compiled the Baichuan2 decode step for %s%s%s in %.1f s",
            "one row" if one_row else "several rows",
            ", keys filling the buffers" if whole else "",
            ", with LoRA adapters" if lora else "",
            seconds,
        )


def _allow_graphs(count: int) -> None:
    """Let dynamo keep ``count`` graphs of one function (one per fixed shape)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), count))
