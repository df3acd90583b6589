"""Preallocated keys/values for the native engine's running sequences (the slot cache).

Each running sequence owns one row (its *slot*) of per-layer key and value buffers of
shape ``[rows, heads, length, head_dim]``; its token at position ``p`` keeps its keys at
``keys[layer][slot, :, p]``. Sequences start at position 0 of their slot, so there is no
padding and a token's position is its index. Joining or leaving the batch copies no
keys or values: a new sequence takes the lowest free slot, an ended one frees it. The
buffers change shape only when a sequence is given a slot they cannot hold: they grow
(rows and length doubling, within the ``KvBudget``), or, when the budget allows no
more rows at their length but the taken slots need less, they re-shape to a shorter
length with more rows (so one long request does not leave later ones running alone).
That copies once. Buffers made ``fixed`` never change shape (compiled graphs keep
their addresses).
"""

from __future__ import annotations

import torch

from langchain_baichuan2.engines.native.budget import KvBudget
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
        max_length: Most positions a row may hold (the model's context); None: no limit.
        max_bytes: Most bytes the buffers (and stored prefixes) may take; None: no limit.
        max_rows: Most rows the buffers may have; None: no limit.

    Attributes:
        budget: The limits above, shared with the prefix cache (``KvBudget``).
    """

    SMALLEST_LENGTH = 256
    SMALLEST_ROWS = 1

    def __init__(
        self,
        devices: list[torch.device],
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        *,
        max_length: int | None = None,
        max_bytes: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.shape = (heads, head_dim)
        self.dtype = dtype
        self.devices = devices
        # Bytes one position of one row takes over all layers (keys and values).
        self.position_bytes = 2 * len(devices) * heads * head_dim * dtype.itemsize
        self.budget = KvBudget(
            self.position_bytes, max_length=max_length, max_bytes=max_bytes, max_rows=max_rows
        )
        self.keys: list[torch.Tensor] = [self._empty(0, 0, d) for d in devices]
        self.values: list[torch.Tensor] = [self._empty(0, 0, d) for d in devices]
        self._used: list[bool] = []
        self._reserved: list[int] = []  # positions each taken slot may reach (0: free)
        self.length = 0  # positions each row holds
        self.fixed = False  # set by ``fix``: the shape never changes again
        # Bumped whenever the buffers are reallocated (compiled steps key on it).
        self.generation = 0

    @property
    def rows(self) -> int:
        """Rows the buffers hold."""
        return len(self._used)

    @property
    def used(self) -> int:
        """Slots taken by sequences."""
        return sum(self._used)

    @property
    def longest(self) -> int | None:
        """Most positions one sequence can ever hold here (None: no limit)."""
        longest = self.budget.longest
        if self.fixed:
            return self.length if longest is None else min(longest, self.length)
        return longest

    def _empty(self, rows: int, length: int, device: torch.device) -> torch.Tensor:
        heads, head_dim = self.shape
        return torch.zeros(rows, heads, length, head_dim, dtype=self.dtype, device=device)

    def _free_slot(self) -> int:
        return next((i for i, used in enumerate(self._used) if not used), self.rows)

    def _shape_for(self, rows: int, length: int) -> tuple[int, int] | None:
        """The buffers' shape once they hold ``rows`` x ``length``; None if they cannot.

        Length doubles up to the longest row allowed; rows double up to what the budget
        allows at that length (fewer rows than now when the length grows, as long as
        every taken slot stays). When that leaves too few rows, a shorter length that
        still holds every taken slot's reservation is tried.
        """
        if rows <= self.rows and length <= self.length:
            return self.rows, self.length
        longest = self.longest
        if self.fixed or (longest is not None and length > longest):
            return None
        new_length = self.length
        if length > self.length:
            new_length = doubled_capacity(length, max(self.length, self.SMALLEST_LENGTH))
            new_length = max(length, min(new_length, longest or new_length))
        shape = self._rows_for(rows, new_length)
        needed = max([length, *self._reserved])
        shortest = doubled_capacity(needed, self.SMALLEST_LENGTH)
        shortest = max(needed, min(shortest, longest or shortest))
        if shape is None and shortest < new_length:
            shape = self._rows_for(rows, shortest)
        return shape

    def _rows_for(self, rows: int, length: int) -> tuple[int, int] | None:
        """Rows x ``length`` holding ``rows`` and every taken slot, if the budget allows."""
        new_rows = self.rows
        if rows > self.rows:
            new_rows = doubled_capacity(rows, max(self.rows, self.SMALLEST_ROWS))
        limit = self.budget.rows_at(length)
        taken = max((i + 1 for i, used in enumerate(self._used) if used), default=0)
        new_rows = min(new_rows, limit if limit is not None else new_rows)
        if new_rows < max(rows, taken):
            return None
        return new_rows, length

    def fits(self, length: int) -> bool:
        """Whether a new sequence of ``length`` positions can be given a slot now."""
        return self._shape_for(self._free_slot() + 1, length) is not None

    def acquire(self, length: int) -> int:
        """Take the lowest free slot, growing the buffers so it holds ``length`` positions.

        Raises:
            RuntimeError: The limits leave no room for it (see ``fits``).
        """
        slot = self._free_slot()
        self.reserve(slot + 1, length)
        self._used[slot] = True
        self._reserved[slot] = length
        return slot

    def release(self, slot: int) -> None:
        """Free ``slot`` for the next sequence (its contents are simply overwritten)."""
        self._used[slot] = False
        self._reserved[slot] = 0

    def reserve(self, rows: int, length: int) -> None:
        """Grow the buffers (copying what they hold) to at least ``rows`` x ``length``.

        Every new buffer is allocated before any replaces an old one, so running out of
        memory here leaves the cache as it was.

        Raises:
            RuntimeError: The limits (or fixed buffers) leave no room for it.
        """
        shape = self._shape_for(rows, length)
        if shape is None:
            msg = (
                f"The slot cache cannot hold {rows} rows of {length} positions "
                f"(it holds {self.rows} x {self.length}, "
                f"{'fixed' if self.fixed else f'at most {self.longest} positions a row'})"
            )
            raise RuntimeError(msg)
        self.resize(*shape)

    def resize(self, rows: int, length: int) -> None:
        """Reallocate the buffers as ``rows`` x ``length``, keeping what the slots hold.

        Taken slots must lie below ``rows``; positions past ``length`` are dropped.
        """
        if (rows, length) == (self.rows, self.length):
            return
        held = self.budget.slot_bytes
        self.budget.claim(rows * length * self.position_bytes)  # stored prefixes make room
        try:
            grown = [
                [self._empty(rows, length, old.device) for old in buffers]
                for buffers in (self.keys, self.values)
            ]
        except BaseException:
            self.budget.claim(held)
            raise
        kept_rows, kept_length = min(rows, self.rows), min(length, self.length)
        for old_buffers, new_buffers in zip((self.keys, self.values), grown, strict=True):
            for old, new in zip(old_buffers, new_buffers, strict=True):
                new[:kept_rows, :, :kept_length] = old[:kept_rows, :, :kept_length]
        self.keys, self.values = grown
        self._used = self._used[:rows] + [False] * (rows - self.rows)
        self._reserved = self._reserved[:rows] + [0] * (rows - len(self._reserved))
        self.length = length
        self.generation += 1

    def fix(self) -> None:
        """Size the buffers once at the largest shape the budget allows; never change it again.

        Rows hold the longest sequence allowed; there are as many as the budget allows
        after the prefix cache's cap (at least one; see ``KvBudget.fixed_shape``). No
        slot may be taken.
        """
        rows, length = self.budget.fixed_shape()
        if self.used:
            raise RuntimeError("The slot buffers can only be fixed while no slot is taken")
        self.resize(rows, length)
        self.fixed = True

    def move_down(self, source: int, length: int) -> int:
        """Move a sequence to the lowest free slot if that lies below ``source``.

        Copies the first ``length`` positions; returns the sequence's slot.
        """
        target = self._free_slot()
        if target > source:
            return source
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, :length] = buffer[source, :, :length]
        self._used[target], self._used[source] = True, False
        self._reserved[target], self._reserved[source] = self._reserved[source], 0
        return target

    def clear(self, slot: int) -> None:
        """Zero a slot: stale NaN would reach later sequences through masked positions."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[slot].zero_()

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
