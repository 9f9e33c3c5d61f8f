"""Build-once caches: a value per key, built on first use, shared between threads.

Sessions and graphs are slow to build (hundreds of milliseconds) and safe to share once built,
so each is built exactly once per key: concurrent callers of one key wait for the one build,
while builds of different keys run in parallel (each key has its own lock; the cache's own lock
is held only to find it). A build that raises caches nothing, so the next caller retries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BuildOnce(Generic[K, V]):
    """``get(key, build)``: the value for ``key``, calling ``build()`` the first time only."""

    def __init__(self) -> None:
        self._values: dict[K, V] = {}
        self._locks: dict[K, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: K, build: Callable[[], V]) -> V:
        try:
            return self._values[key]
        except KeyError:
            pass
        with self._lock:
            key_lock = self._locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._values:
                self._values[key] = build()
            return self._values[key]

    def peek(self, key: K) -> V | None:
        """The value if it has been built, else None (never builds)."""
        return self._values.get(key)

    def __len__(self) -> int:
        return len(self._values)
