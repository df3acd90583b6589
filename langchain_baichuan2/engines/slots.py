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


def doubled_capacity(needed: int, current: int = 1) -> int:
    """``current`` (at least 1) doubled until it holds ``needed``."""
    size = max(current, 1)
    while size < needed:
        size *= 2
    return size


class SlotCache:
    """Per-layer key/value buffers whose rows are handed out to sequences.

    Args:
        devices: The device of each decoder layer (its buffers live there).
        heads: Attention heads per layer.
        head_dim: Size of one head.
        dtype: Dtype of keys and values (the model's compute dtype).
    """

    SMALLEST_LENGTH = 256
    SMALLEST_ROWS = 1

    def __init__(
        self, devices: list[torch.device], heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        self.shape = (heads, head_dim)
        self.dtype = dtype
        self.devices = devices
        self.keys: list[torch.Tensor] = [self._empty(0, 0, d) for d in devices]
        self.values: list[torch.Tensor] = [self._empty(0, 0, d) for d in devices]
        self._used: list[bool] = []
        self.length = 0  # positions each row holds
        # Bumped whenever the buffers are reallocated (compiled steps key on it).
        self.generation = 0

    @property
    def rows(self) -> int:
        """Rows the buffers hold."""
        return len(self._used)

    def _empty(self, rows: int, length: int, device: torch.device) -> torch.Tensor:
        heads, head_dim = self.shape
        return torch.zeros(rows, heads, length, head_dim, dtype=self.dtype, device=device)

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
        """Grow the buffers (copying what they hold) to at least ``rows`` x ``length``.

        Every new buffer is allocated before any replaces an old one, so running out of
        memory here leaves the cache as it was.
        """
        new_rows = doubled_capacity(rows, max(self.rows, self.SMALLEST_ROWS))
        new_length = doubled_capacity(length, max(self.length, self.SMALLEST_LENGTH))
        if (new_rows, new_length) == (self.rows, self.length):
            return
        grown = [
            [self._empty(new_rows, new_length, old.device) for old in buffers]
            for buffers in (self.keys, self.values)
        ]
        for old_buffers, new_buffers in zip((self.keys, self.values), grown, strict=True):
            for old, new in zip(old_buffers, new_buffers, strict=True):
                new[: self.rows, :, : self.length] = old
        self.keys, self.values = grown
        self._used += [False] * (new_rows - self.rows)
        self.length = new_length
        self.generation += 1

    def write(self, slot: int, kv: LayerKV) -> None:
        """Copy stored keys/values (``[1, H, n, D]`` per layer) into positions ``0..n-1``."""
        for layer, (k, v) in enumerate(kv):
            n = k.shape[2]
            self.keys[layer][slot, :, :n] = k[0].to(self.devices[layer])
            self.values[layer][slot, :, :n] = v[0].to(self.devices[layer])

    def read(self, slot: int, length: int) -> LayerKV:
        """Views of ``slot``'s first ``length`` positions, ``[1, H, length, D]`` per layer."""
        return [
            (k[slot : slot + 1, :, :length], v[slot : slot + 1, :, :length])
            for k, v in zip(self.keys, self.values, strict=True)
        ]
