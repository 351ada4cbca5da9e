"""The per-process memory tier: a byte-budget LRU of immutable ``bytes``.

A hit returns the cached object itself (``bytes`` cannot be changed, so no copy is
needed). Objects larger than the whole budget are not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["MemoryTier"]

M = TypeVar("M")


class MemoryTier(Generic[M]):
    """Thread-safe LRU keyed by string, holding ``(meta, data)`` pairs.

    Args:
        budget: bytes of data kept at most (``0`` keeps nothing).
        on_event: ``on_event(name, amount)`` for metrics (``evictions``).
    """

    def __init__(
        self, budget: int, on_event: Callable[[str, int], None] = lambda name, amount: None
    ) -> None:
        self.budget = budget
        self.on_event = on_event
        self._items: OrderedDict[str, tuple[M, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[M, bytes] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, meta: M, data: bytes) -> None:
        size = len(data)
        if size > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._items[key] = (meta, data)
            self._bytes += size
            evicted = 0
            while self._bytes > self.budget:
                _, (_, victim) = self._items.popitem(last=False)
                self._bytes -= len(victim)
                evicted += 1
        if evicted:
            self.on_event("evictions", evicted)

    def update_meta(self, key: str, meta: M) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items[key] = (meta, item[1])

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
