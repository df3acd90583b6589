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

Each layer's keys (and values) are a view of one flat storage. Unfixed, the storage is
reallocated at each change of shape (copying once, and handing memory the buffers no
longer need back to the prefix cache). ``fix`` allocates it once at the budget's size
(on a GPU: growing would need the old and the new storage at once); from then on a
change of shape is a new view of the same storage, the taken rows' keys/values moved
inside it, so rows sized by what admission reserved fit as many as the bytes allow.
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
        # One flat storage per layer for keys and one for values; the buffers view them.
        self._stores: tuple[list[torch.Tensor], list[torch.Tensor]] = (
            [self._empty(0, d) for d in devices],
            [self._empty(0, d) for d in devices],
        )
        self.keys: list[torch.Tensor] = [self._view(s, 0, 0) for s in self._stores[0]]
        self.values: list[torch.Tensor] = [self._view(s, 0, 0) for s in self._stores[1]]
        self._used: list[bool] = []
        self._reserved: list[int] = []  # positions each taken slot may reach (0: free)
        self.length = 0  # positions each row holds
        self.fixed = False  # set by ``fix``: the storage is never reallocated again
        # Bumped whenever the buffers change shape (compiled steps key on it).
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
            return self.capacity if longest is None else min(longest, self.capacity)
        return longest

    @property
    def capacity(self) -> int:
        """Row positions (rows x length) the storage holds."""
        heads, head_dim = self.shape
        return self._stores[0][0].numel() // (heads * head_dim) if self.devices else 0

    @torch.inference_mode(False)  # the same kind of tensor whoever grows it (compiled guards)
    def _empty(self, positions: int, device: torch.device) -> torch.Tensor:
        heads, head_dim = self.shape
        return torch.zeros(positions * heads * head_dim, dtype=self.dtype, device=device)

    def _view(self, store: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """``store``'s first ``rows x length`` positions as ``[rows, heads, length, head_dim]``."""
        heads, head_dim = self.shape
        return store[: rows * heads * length * head_dim].view(rows, heads, length, head_dim)

    def scratch(self, rows: int, length: int) -> list[torch.Tensor]:
        """Per-device buffers shaped and made as the slots' are, outside the cache.

        Views ``[rows, heads, length, head_dim]`` of new flat storage, as the real slots
        are, so a step compiled on them (the warm-up's private inputs) fits the slots.
        """
        return [self._view(self._empty(rows * length, d), rows, length) for d in self.devices]

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
        if longest is not None and length > longest:
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
        if self.fixed:  # the storage's bytes, not the budget's
            fits = self.capacity // max(length, 1)
            limit = fits if limit is None else min(limit, fits)
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
                f"at most {self.longest} positions a row)"
            )
            raise RuntimeError(msg)
        self.resize(*shape)

    def resize(self, rows: int, length: int) -> None:
        """Make the buffers ``rows`` x ``length``, keeping what the taken slots hold.

        Taken slots must lie below ``rows`` and hold at most ``length`` positions.
        Fixed storage is viewed anew (see ``_move_rows``), other storage reallocated.
        """
        if (rows, length) == (self.rows, self.length):
            return
        if self.fixed:
            if rows * length > self.capacity:
                raise RuntimeError(f"The fixed slot storage cannot hold {rows} x {length}")
            self._move_rows(rows, length)
        else:
            self._reallocate(rows, length, rows * length)
        self._used = self._used[:rows] + [False] * (rows - self.rows)
        self._reserved = self._reserved[:rows] + [0] * (rows - len(self._reserved))
        self.length = length
        self.generation += 1

    def _reallocate(self, rows: int, length: int, capacity: int) -> None:
        """New storage of ``capacity`` positions viewed as ``rows`` x ``length``, rows copied.

        Every new storage is allocated before any replaces an old one, so running out of
        memory here leaves the cache as it was.
        """
        held = self.budget.slot_bytes
        self.budget.claim(capacity * self.position_bytes)  # stored prefixes make room
        try:
            stores = tuple([self._empty(capacity, s.device) for s in kind] for kind in self._stores)
        except BaseException:
            self.budget.claim(held)
            raise
        kept_rows, kept_length = min(rows, self.rows), min(length, self.length)
        views = []
        for old_buffers, new_stores in zip((self.keys, self.values), stores, strict=True):
            views.append([self._view(store, rows, length) for store in new_stores])
            for old, new in zip(old_buffers, views[-1], strict=True):
                new[:kept_rows, :, :kept_length] = old[:kept_rows, :, :kept_length]
        self._stores = (stores[0], stores[1])
        self.keys, self.values = views

    def _move_rows(self, rows: int, length: int) -> None:
        """View the same storage as ``rows`` x ``length``, moving each taken row's keys/values.

        Row ``r`` starts at ``r * length`` positions, so a row moves when the length
        changes: each one goes through a one-row copy, in increasing row order when the
        length shrinks and decreasing when it grows, so no row is overwritten before it
        has moved. What the taken rows do not hold is zeroed (stale values would reach
        later sequences through masked positions).
        """
        old_length = self.length
        kept = min(length, old_length)
        taken = [i for i, used in enumerate(self._used) if used]
        order = taken if length < old_length else taken[::-1]
        free = [row for row in range(rows) if row >= len(self._used) or not self._used[row]]
        views = []
        for old_buffers, kind in zip((self.keys, self.values), self._stores, strict=True):
            views.append([self._view(store, rows, length) for store in kind])
            for old, new in zip(old_buffers, views[-1], strict=True):
                if length != old_length:
                    for row in order:
                        new[row, :, :kept] = old[row, :, :kept].clone()
                        new[row, :, kept:].zero_()
                for row in free:
                    new[row].zero_()
        self.keys, self.values = views

    def fix(self) -> None:
        """Allocate the storage once at the budget's size; never reallocate it again.

        It holds what the budget leaves after the prefix cache's cap (at least one
        full-context row, at most ``max_rows`` of them), viewed at first as the rows of
        ``KvBudget.fixed_shape``; later shapes re-view it (shorter rows, more of them).
        No slot may be taken.
        """
        rows, length = self.budget.fixed_shape()
        if self.used:
            raise RuntimeError("The slot buffers can only be fixed while no slot is taken")
        if self.fixed:
            return
        budget = self.budget
        capacity = rows * length
        if budget.max_bytes is not None:
            left = budget.max_bytes // self.position_bytes - budget.prefix.budget_tokens
            most = left if budget.max_rows is None else min(left, budget.max_rows * length)
            capacity = max(capacity, most)
        self._reallocate(rows, length, capacity)
        self._used = [False] * rows
        self._reserved = [0] * rows
        self.length = length
        self.generation += 1
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
