"""The native engine's one memory budget (``KvBudget``) and what is set aside before it.

On a GPU the default budget is what is left of the free memory once every other use
is set aside (``Reservations``): a prefill's workspace, the decode step's fp32
``[rows, vocab]`` temporaries at the most rows, the CUDA-graph pool and an embedding
forward. The slot buffers of running requests and the prefix cache's stored prompts
share ``kv_cache_bytes``. Running requests come first: slot buffers that grow evict
stored prefixes, the prefix cache keeps what the buffers leave (within its own token
cap), and running out of memory empties it (``relieve``). Each request reserves its
whole slot when it is admitted (``reserved_length``), so buffers never grow in the
middle of decoding.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import torch

from langchain_baichuan2.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Most requests decoding at once, whatever the memory budget allows.
DEFAULT_MAX_ROWS = 64
# Share of a GPU's free memory (after loading) the engine plans with: the reservations
# below, then the keys/values. The rest is slack for the allocator's fragmentation.
GPU_MEMORY_SHARE = 0.95
# fp32 [rows, vocab] tensors a decode step holds at once: the logits kept between
# steps, the penalized copy, the masks, softmax, top-k/top-p values and indices.
STEP_TEMPORARIES = 10
# Most tokens one embedding forward runs (``Baichuan2Embeddings`` cuts batches to it).
EMBEDDING_FORWARD_TOKENS = 8192
# Allocator slack of a prefill, and a CUDA-graph pool's fixed part.
PREFILL_SLACK = 2**29
GRAPH_POOL_BASE = 2**28


def attention_mask_bytes(config: Any, queries: int, keys: int) -> int:
    """Peak bytes of the attention mask of ``queries`` x ``keys`` positions.

    Per head for ALiBi (built through fp32 before the model's dtype), one for RoPE;
    8 bytes an entry covers the fp32 bias, its cast and the distances.
    """
    heads = config.num_attention_heads if config.position_embedding == "alibi" else 1
    return 8 * heads * queries * keys


def activation_bytes(config: Any, tokens: int, dtype_bytes: int) -> int:
    """Bytes of one layer's activations for ``tokens`` tokens (nothing kept between layers).

    The residual, the normed input, the attention's output and the three projections
    (6 x hidden) and the MLP's three intermediates (3 x intermediate), per token.
    """
    return tokens * (6 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes


def prefill_workspace_bytes(config: Any, tokens: int, context: int, dtype_bytes: int = 2) -> int:
    """Memory a prefill of ``tokens`` new tokens (up to ``context`` keys) needs beside the buffers.

    Its attention mask, one layer's activations and ``PREFILL_SLACK``; a chunked
    prefill (``prefill_chunk_tokens``) needs the workspace of one chunk.
    """
    return (
        PREFILL_SLACK
        + attention_mask_bytes(config, tokens, context)
        + activation_bytes(config, tokens, dtype_bytes)
    )


def step_temporaries_bytes(rows: int, vocab: int) -> int:
    """The ``STEP_TEMPORARIES`` fp32 ``[rows, vocab]`` tensors of a decode step."""
    return STEP_TEMPORARIES * rows * vocab * 4


def graph_pool_bytes(config: Any, rows: int, context: int, dtype_bytes: int = 2) -> int:
    """An estimate of the CUDA-graph pool: a step's intermediates at ``rows`` x ``context``.

    The largest recorded step's activations and attention (fp32 scores and probabilities
    of every head over every key), twice (a replay's outputs stay alive until the
    next), plus ``GRAPH_POOL_BASE``. Recorded graphs of one pool share its memory.
    """
    attention = rows * config.num_attention_heads * context * (4 + dtype_bytes)
    return GRAPH_POOL_BASE + 2 * (activation_bytes(config, rows, dtype_bytes) + attention)


def embedding_forward_bytes(config: Any, context: int, dtype_bytes: int = 2) -> int:
    """Memory one ``Baichuan2Embeddings`` forward of ``EMBEDDING_FORWARD_TOKENS`` tokens needs.

    Its activations, the pooled layer's states (kept) with their fp32 copy and
    weights, and the attention mask of its longest text (``context``).
    """
    tokens = EMBEDDING_FORWARD_TOKENS
    pooled = tokens * config.hidden_size * (dtype_bytes + 8)
    return (
        activation_bytes(config, tokens, dtype_bytes)
        + pooled
        + attention_mask_bytes(config, context, context)
    )


@dataclass(frozen=True)
class Reservations:
    """Memory set aside on each GPU before the keys/values get their share.

    A prefill and an embedding forward both run under the model's lock, never at
    once, and the allocator reuses the one's freed memory for the other: only the
    larger is set aside. The step temporaries and the graph pool live beside them.
    """

    prefill_workspace: int
    step_temporaries: int
    graph_pool: int
    embedding_forward: int

    @classmethod
    def of(
        cls, config: Any, context: int, rows: int, prefill_tokens: int, dtype_bytes: int
    ) -> Reservations:
        """The reservations of a model serving ``rows`` rows, prefilling ``prefill_tokens``."""
        return cls(
            prefill_workspace=prefill_workspace_bytes(config, prefill_tokens, context, dtype_bytes),
            step_temporaries=step_temporaries_bytes(rows, config.vocab_size),
            graph_pool=graph_pool_bytes(config, rows, context, dtype_bytes),
            embedding_forward=embedding_forward_bytes(config, context, dtype_bytes),
        )

    @property
    def total(self) -> int:
        """Bytes set aside: step temporaries, graph pool, the larger forward workspace."""
        workspace = max(self.prefill_workspace, self.embedding_forward)
        return self.step_temporaries + self.graph_pool + workspace


def default_kv_cache_bytes(
    devices: list[torch.device],
    position_bytes: int,
    config: Any,
    context: int,
    rows: int = DEFAULT_MAX_ROWS,
    prefill_tokens: int | None = None,
) -> int:
    """The key/value budget when none is given.

    On a GPU: ``GPU_MEMORY_SHARE`` of the memory free on each layer's device after
    loading (counting torch's cached free blocks), less the ``Reservations`` (on every
    device, to be safe with split models), for that device's share of the layers. On
    a CPU: a quarter of the memory available after loading.

    Args:
        devices: The device of each decoder layer.
        position_bytes: Bytes one position takes over all layers (keys and values).
        config: The model's config.
        context: The model's context length.
        rows: Most rows decoding at once (``max_rows``).
        prefill_tokens: Most tokens one prefill call feeds (None: the context).
    """
    layers = Counter(devices)
    per_layer_position = position_bytes // len(devices)
    dtype_bytes = max(1, per_layer_position // (2 * config.hidden_size))
    reserved = Reservations.of(config, context, rows, prefill_tokens or context, dtype_bytes)
    positions = []
    for device, count in layers.items():
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            usable = GPU_MEMORY_SHARE * free - reserved.total
            logger.info(
                "Key/value budget on %s: %.0f%% of %.2f GiB free, less %s",
                device,
                100 * GPU_MEMORY_SHARE,
                free / 2**30,
                reserved,
            )
        else:
            usable = psutil.virtual_memory().available / 4
        positions.append(max(0, int(usable)) // (count * per_layer_position))
    return min(positions) * position_bytes


def out_of_memory_for_a_request(
    what: str, advice: str, cause: torch.OutOfMemoryError
) -> torch.OutOfMemoryError:
    """The error one request gets when memory ran out.

    It says what happened (``what``, with the numbers), what to change (``advice``),
    then the device's own message (``cause``, chained).
    """
    error = torch.OutOfMemoryError(f"Out of memory {what}. {advice} {cause}")
    error.__cause__ = cause
    return error


class KvBudget:
    """Bytes, rows and lengths the keys/values may take, and the prefix cache's share.

    Args:
        position_bytes: Bytes one position of one row takes over all layers.
        max_length: Most positions a row may hold (the model's context); None: no limit.
        max_bytes: Most bytes slot buffers and stored prefixes take together; None: no
            limit.
        max_rows: Most rows (requests decoding at once); None: no limit.

    Attributes:
        slot_bytes: Bytes the slot buffers hold now (kept by the slot cache).
        prefix: The prefix cache; it holds at most what the slot buffers leave.
    """

    def __init__(
        self,
        position_bytes: int,
        *,
        max_length: int | None = None,
        max_bytes: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.position_bytes = position_bytes
        self.max_length = max_length
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.slot_bytes = 0
        self.prefix = PrefixCache(room=self.prefix_room)

    def set_bytes(self, max_bytes: int) -> None:
        """Set ``max_bytes``; it must hold at least one position."""
        if max_bytes < self.position_bytes:
            msg = (
                f"kv_cache_bytes={max_bytes} cannot hold one position of this model's "
                f"keys and values ({self.position_bytes} bytes)"
            )
            raise ValueError(msg)
        self.max_bytes = max_bytes
        self.prefix.fit()

    @property
    def longest(self) -> int | None:
        """Most positions one row can ever hold (None: no limit)."""
        limits = [self.max_length]
        if self.max_bytes is not None:
            limits.append(self.max_bytes // self.position_bytes)
        return min((n for n in limits if n is not None), default=None)

    def rows_at(self, length: int, kept_tokens: int = 0) -> int | None:
        """Most rows of ``length`` positions, leaving ``kept_tokens`` (None: no limit)."""
        limits = [self.max_rows]
        if self.max_bytes is not None:
            free = self.max_bytes - kept_tokens * self.position_bytes
            limits.append(max(0, free) // (max(length, 1) * self.position_bytes))
        return min((n for n in limits if n is not None), default=None)

    def fixed_shape(self) -> tuple[int, int]:
        """Rows x length of buffers sized once for good: every row holds the longest row.

        As many rows as ``max_rows`` and the bytes allow after the prefix cache's cap
        (at least one).

        Raises:
            ValueError: There is no length limit, or neither a row nor a byte limit.
        """
        longest = self.longest
        if longest is None or (self.max_rows is None and self.max_bytes is None):
            raise ValueError("Fixed slot buffers need a length limit and a row or byte limit")
        rows = self.rows_at(longest, self.prefix.budget_tokens)
        return max(1, rows if rows is not None else 1), longest

    def reserved_length(self, prompt_length: int, max_new_tokens: int) -> int:
        """Positions a request's slot must hold: ``min(prompt + max_new_tokens, context)``.

        Raises:
            ValueError: The prompt is empty, longer than the context, or the request
                cannot fit the budget even alone.
        """
        if not prompt_length:
            raise ValueError("The prompt is empty: there is nothing to generate from")
        context = self.max_length if self.max_length is not None else sys.maxsize
        if prompt_length > context:
            msg = (
                f"The prompt (length {prompt_length}) is longer than the maximum model "
                f"length of {context}. Shorten it (ChatBaichuan2 cuts prompts "
                "to fit model_max_length - max_tokens; do not raise model_max_length past "
                "the model's context)."
            )
            raise ValueError(msg)
        reserved = min(prompt_length + max_new_tokens, context)
        longest = self.longest
        if longest is not None and reserved > longest:
            msg = (
                f"This request needs {reserved} positions of key/value cache "
                f"({reserved * self.position_bytes / 2**20:.1f} MiB: prompt and max_tokens), "
                f"more than kv_cache_bytes={self.max_bytes} holds for one request "
                f"({longest} positions). Lower max_tokens or raise kv_cache_bytes."
            )
            raise ValueError(msg)
        return reserved

    def prefix_room(self) -> int:
        """Tokens the prefix cache may hold now: what the slot buffers leave."""
        if self.max_bytes is None:
            return sys.maxsize
        return max(0, self.max_bytes - self.slot_bytes) // self.position_bytes

    def claim(self, slot_bytes: int) -> None:
        """Record the slot buffers' new size, evicting stored prefixes it leaves no room for."""
        self.slot_bytes = slot_bytes
        self.prefix.fit()

    def relieve(self) -> bool:
        """Free what the budget holds beside the running rows, after running out of memory.

        Empties the prefix cache and hands torch's cached blocks back to the GPU.
        Returns whether the prefix cache held anything (then a retry may succeed).
        """
        held = self.prefix.stored_tokens > 0
        self.prefix.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if held:
            logger.warning("Out of memory: emptied the prefix cache to make room")
        return held

    def relieved(self, action: Callable[..., T], *args: Any) -> T:
        """Run ``action(*args)``; out of memory, ``relieve`` and retry it once if that freed any."""
        try:
            return action(*args)
        except torch.OutOfMemoryError:
            if not self.relieve():
                raise
            return action(*args)
