"""Reuse of the KV cache of recent prompts (prefix caching), within a token budget.

A chat re-sends its whole history every turn and an agent re-sends a growing
transcript: the new prompt starts with ids the model has already seen. The store keeps
the keys/values of recent sequences and hands back the longest stored prefix of a new
prompt, so only the remainder is prefilled. Entries are evicted least recently used
first once the total stored tokens exceed the budget, or the room a memory budget
shared with other buffers leaves them (``room``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

# Keys and values of one sequence: one (keys, values) pair per layer, [1, H, L, D] each.
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Least-recently-used store of per-sequence KV caches.

    Args:
        budget_tokens: Most tokens kept over all entries; 0 disables the store.
        room: Tokens a shared memory budget leaves the store right now (read on
            every store and by ``fit``); None: no other limit.
    """

    def __init__(self, budget_tokens: int = 0, room: Callable[[], int] | None = None) -> None:
        self.budget_tokens = budget_tokens
        self._room = room
        self._entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def stored_tokens(self) -> int:
        """Tokens currently held over all entries."""
        return sum(len(ids) for ids in self._entries)

    def entries(self) -> list[tuple[int, ...]]:
        """The stored id sequences, least recently used first."""
        with self._lock:
            return list(self._entries)

    def resize(self, budget_tokens: int) -> None:
        """Change the budget, evicting what no longer fits (0 empties the store)."""
        with self._lock:
            self.budget_tokens = budget_tokens
            self._evict()

    def grow_to(self, budget_tokens: int) -> None:
        """Raise the budget to ``budget_tokens`` if it is lower (never shrinks it)."""
        with self._lock:
            self.budget_tokens = max(self.budget_tokens, budget_tokens)

    @property
    def limit(self) -> int:
        """Most tokens the store may hold now: its budget, within the room it is left."""
        return self.budget_tokens if self._room is None else min(self.budget_tokens, self._room())

    def fit(self) -> None:
        """Evict least recently used entries until the store is within ``limit``."""
        with self._lock:
            self._evict()

    def lookup(self, ids: Sequence[int]) -> tuple[int, LayerKV | None]:
        """The longest stored prefix of ``ids``, leaving at least one id to prefill.

        Returns:
            The number of reused ids and their per-layer keys/values (views of the
            stored tensors), or ``(0, None)``.
        """
        with self._lock:
            best, best_key = 0, None
            for key in self._entries:
                shared = min(common_prefix_length(key, ids), len(ids) - 1)
                if shared > best:
                    best, best_key = shared, key
            if best_key is None:
                return 0, None
            self._entries.move_to_end(best_key)
            kv = self._entries[best_key]
            return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv]

    def store(self, ids: Sequence[int], kv: LayerKV) -> None:
        """Keep ``kv`` (``len(ids)`` positions per layer) for ``ids``.

        Entries that are prefixes of ``ids`` are dropped (the new entry serves them);
        if an entry already extends ``ids``, it is only marked as recently used. Older
        entries are evicted before the copy is made, so the store never holds more
        than its limit, even for a moment.
        """
        key = tuple(ids)
        if not key or len(key) > self.limit:
            return
        with self._lock:
            longer = next((k for k in self._entries if k[: len(key)] == key), None)
            if longer is not None:  # an entry already holds this prefix: just touch it
                self._entries.move_to_end(longer)
                return
            for old in [k for k in self._entries if k == key[: len(k)]]:
                del self._entries[old]
            self._evict(room=len(key))
            self._entries[key] = [(k.clone(), v.clone()) for k, v in kv]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()

    def _evict(self, room: int = 0) -> None:
        """Evict least recently used entries until ``room`` more tokens fit the limit."""
        limit = self.limit - room
        while self._entries and self.stored_tokens > limit:
            self._entries.popitem(last=False)
