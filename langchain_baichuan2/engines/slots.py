"""Preallocated keys/values for the native engine's running sequences (the slot cache).

Each running sequence owns one row (its *slot*) of per-layer key and value buffers of
shape ``[rows, heads, length, head_dim]``; its token at position ``p`` keeps its keys at
``keys[layer][slot, :, p]``. Sequences start at position 0 of their slot, so there is no
padding and a token's position is its index. Joining or leaving the batch copies no
keys or values: a new sequence takes the lowest free slot, an ended one frees it. The
buffers grow (rows and length doubling) only when a sequence needs more than they
hold; that copies once.
"""

from __future__ import annotations

import torch

from langchain_baichuan2.prefix_cache import LayerKV


def _capacity(needed: int, current: int, smallest: int) -> int:
    """The next power of two that holds ``needed`` (at least ``smallest``)."""
    size = max(current, smallest)
    while size < needed:
        size *= 2
    return size


class SlotCache:
    """Per-layer key/value buffers whose rows are handed out to sequences.

    Args:
        layers: Decoder layers of the model.
        heads: Attention heads per layer.
        head_dim: Size of one head.
        dtype: Dtype of keys and values (the model's compute dtype).
        device: Where the buffers live.
    """

    SMALLEST_LENGTH = 256
    SMALLEST_ROWS = 1

    def __init__(
        self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = (heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.keys: list[torch.Tensor] = [self._empty(0, 0) for _ in range(layers)]
        self.values: list[torch.Tensor] = [self._empty(0, 0) for _ in range(layers)]
        self._used: list[bool] = []
        # Bumped whenever the buffers are reallocated (compiled steps key on it).
        self.generation = 0

    @property
    def rows(self) -> int:
        """Rows the buffers hold."""
        return len(self._used)

    @property
    def length(self) -> int:
        """Positions each row holds."""
        return self.keys[0].shape[2]

    def _empty(self, rows: int, length: int) -> torch.Tensor:
        heads, head_dim = self.shape
        return torch.zeros(rows, heads, length, head_dim, dtype=self.dtype, device=self.device)

    def acquire(self, length: int) -> int:
        """Take the lowest free slot, growing the buffers so it holds ``length`` positions."""
        slot = next((i for i, used in enumerate(self._used) if not used), self.rows)
        self.reserve(slot + 1, length)
        self._used[slot] = True
        return slot

    def release(self, slot: int) -> None:
        """Free ``slot`` for the next sequence (its contents are simply overwritten)."""
        self._used[slot] = False

    def reserve(self, rows: int, length: int) -> None:
        """Grow the buffers (copying what they hold) to at least ``rows`` x ``length``."""
        new_rows = _capacity(rows, self.rows, self.SMALLEST_ROWS)
        new_length = _capacity(length, self.length, self.SMALLEST_LENGTH)
        if (new_rows, new_length) == (self.rows, self.length):
            return
        old_rows, old_length = self.rows, self.length
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                grown = self._empty(new_rows, new_length)
                grown[:old_rows, :, :old_length] = old
                buffers[layer] = grown
        self._used += [False] * (new_rows - old_rows)
        self.generation += 1

    def write(self, slot: int, kv: LayerKV) -> None:
        """Copy stored keys/values (``[1, H, n, D]`` per layer) into positions ``0..n-1``."""
        for layer, (k, v) in enumerate(kv):
            n = k.shape[2]
            self.keys[layer][slot, :, :n] = k[0]
            self.values[layer][slot, :, :n] = v[0]

    def read(self, slot: int, length: int) -> LayerKV:
        """Views of ``slot``'s first ``length`` positions, ``[1, H, length, D]`` per layer."""
        return [
            (k[slot : slot + 1, :, :length], v[slot : slot + 1, :, :length])
            for k, v in zip(self.keys, self.values, strict=True)
        ]
