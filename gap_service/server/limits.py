"""Admission control: at most N computations at once, at most Q more waiting (FIFO), the rest refused.

A waiter gives up when its caller cancels or its deadline passes; a refusal is a
ResourceLimitError (RESOURCE_EXHAUSTED). ``on_change(running, waiting)`` feeds the metrics.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CancelledError, ResourceLimitError
from .errors import DeadlineExceededError

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ServerLimits:
    """Every limit the server enforces (reported in GetModel)."""

    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int = 40_000_000
    max_tree_nodes: int = 2000
    max_concurrent: int = 1
    max_queue: int = 64
    max_concurrent_predict: int = 4
    max_queue_predict: int = 64


class Admission:
    """A bounded pool of slots with a bounded FIFO queue in front of it."""

    def __init__(self, name: str, slots: int, queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        if slots < 1 or queue < 0:
            raise ValueError("need slots >= 1 and queue >= 0")
        self.name = name
        self.slots = slots
        self.queue = queue
        self._on_change = on_change or (lambda running, waiting: None)
        self._lock = threading.Lock()
        self._running = 0
        self._waiters: collections.deque[threading.Event] = collections.deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, is_active: Callable[[], bool] = lambda: True,
                time_remaining: Callable[[], float | None] = lambda: None) -> None:
        """Take a slot, waiting in the queue if needed; raise when refused or given up."""
        with self._lock:
            if self._running < self.slots and not self._waiters:
                self._running += 1
                self._changed()
                return
            if len(self._waiters) >= self.queue:
                raise ResourceLimitError(
                    f"server busy: {self._running} {self.name} running and {len(self._waiters)} queued "
                    f"(limits {self.slots} and {self.queue}); retry later"
                )
            ticket = threading.Event()
            self._waiters.append(ticket)
            self._changed()
        while not ticket.wait(POLL_SECONDS):
            remaining = time_remaining()
            expired = remaining is not None and remaining <= 0
            if expired or not is_active():
                with self._lock:
                    if not ticket.is_set():
                        self._waiters.remove(ticket)
                        self._changed()
                        ticket = None  # type: ignore[assignment]
                if ticket is not None:  # a slot was handed over meanwhile: pass it on
                    self.release()
                if expired:
                    raise DeadlineExceededError(f"deadline passed while queued for {self.name}")
                raise CancelledError(f"cancelled while queued for {self.name}")

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # hand the slot over; running stays the same
            else:
                self._running -= 1
            self._changed()

    def _changed(self) -> None:
        self._on_change(self._running, len(self._waiters))
