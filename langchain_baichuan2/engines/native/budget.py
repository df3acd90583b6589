"""The native engine's one memory budget for keys/values (``KvBudget``).

The slot buffers of running requests and the prefix cache's stored prompts share
``kv_cache_bytes``. Running requests come first: slot buffers that grow evict stored
prefixes, and the prefix cache keeps what the buffers leave (within its own token cap).
Each request reserves its whole slot when it is admitted (``reserved_length``), so
buffers never grow in the middle of decoding.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import psutil
import torch

from langchain_baichuan2.prefix_cache import PrefixCache

# Most requests decoding at once, whatever the memory budget allows.
DEFAULT_MAX_ROWS = 64
# Share of a GPU's free memory (after loading) the key/value buffers may take by
# default, before the prefill workspace is set aside.
GPU_MEMORY_SHARE = 0.9


def prefill_workspace_bytes(config: Any, context: int) -> int:
    """Memory a prefill of ``context`` tokens may need beside the key/value buffers.

    A rough bound: the attention mask (per head for ALiBi, with fp32 intermediates)
    plus 1 GiB for activations, logits and allocator slack.
    """
    heads = config.num_attention_heads if config.position_embedding == "alibi" else 1
    return 2**30 + 8 * heads * context * context


def default_kv_cache_bytes(
    devices: list[torch.device], position_bytes: int, config: Any, context: int
) -> int:
    """The key/value budget when none is given.

    On a GPU: 90% of the memory free on each layer's device after loading (counting
    torch's cached free blocks), less a prefill workspace, for that device's share of
    the layers. On a CPU: a quarter of the memory available after loading.

    Args:
        devices: The device of each decoder layer.
        position_bytes: Bytes one position takes over all layers (keys and values).
        config: The model's config.
        context: The model's context length.
    """
    layers = Counter(devices)
    per_layer_position = position_bytes // len(devices)
    positions = []
    for device, count in layers.items():
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            usable = GPU_MEMORY_SHARE * free - prefill_workspace_bytes(config, context)
        else:
            usable = psutil.virtual_memory().available / 4
        positions.append(max(0, int(usable)) // (count * per_layer_position))
    return min(positions) * position_bytes


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
