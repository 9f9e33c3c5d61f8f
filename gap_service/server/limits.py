"""The server's limits, and admission control: at most N computations at once, at most Q more
waiting (FIFO), the rest refused.

A waiter gives up when its caller cancels or its deadline passes; a refusal is a
ResourceLimitError (RESOURCE_EXHAUSTED). ``on_change(running, waiting)`` feeds the metrics.
``ServerLimits.check_inputs`` and ``explain_response_bound`` judge a request of several inputs
before any work: how many inputs, and the largest response its trees could make.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..colors import heatmap_bytes_bound
from ..errors import CancelledError, ResourceLimitError, exceeded
from ..explainer import ModelDescription
from ..options import ExplainOptions, RegionTarget
from ..wire.messages import OutputOptions
from .errors import DeadlineExceededError

POLL_SECONDS = 0.05
NODE_BYTES = 1024  # a node's message without its map and heatmap: ids, level, layer name, scores, path, children
TREE_BYTES = 2**16  # an explanation's header: names, label, layers, what was explained (a mask aside)


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
    max_batch_inputs: int = 64  # inputs of one Predict or Explain request (its ``inputs``)

    def check_inputs(self, count: int) -> None:
        """Refuse a request with more ``inputs`` than ``max_batch_inputs`` (RESOURCE_EXHAUSTED naming inputs)."""
        if count > self.max_batch_inputs:
            description = (f"{count} inputs; a request may carry at most {self.max_batch_inputs} "
                           "(GetModel: limits.max_batch_inputs): split them over several requests")
            raise exceeded("inputs", description)


def explain_response_bound(description: ModelDescription, options: ExplainOptions, output: OutputOptions,
                           inputs: int) -> int:
    """Largest Explain response for ``inputs`` trees of these options: each tree at its worst case
    (every node of 1 + k + ... + k^depth), a map (in ``output.map_dtype``) and a heatmap for every node
    of the levels that carry them (``output.map_levels``), at the model's largest map, plus the
    picture and CAMs when asked for. The same per-node sizes as ``LoadedModel.response_bytes_bound``,
    which sizes ``max_response_bytes`` for one tree with every output option on."""
    nodes = options.worst_case_nodes()
    deepest = options.depth if output.map_levels is None else min(options.depth, output.map_levels)
    mapped = sum(options.top_k**level for level in range(deepest + 1))
    height, width = description.input_hw
    itemsize = np.dtype(output.map_dtype).itemsize
    per_map = itemsize * description.max_map_elements
    per_mapped_node = (0 if output.omit_maps else per_map) + (heatmap_bytes_bound((height, width)) if output.heatmaps else 0)
    mask = options.target.mask if isinstance(options.target, RegionTarget) else None
    tree = (nodes * NODE_BYTES + mapped * per_mapped_node + TREE_BYTES + (4 * np.size(mask) if mask is not None else 0)
            + (height * width * 3 + 1024 if output.picture else 0) + (3 * (per_map + 256) if output.cams else 0))
    return inputs * (tree + 16)  # each Explanation's tag and length


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
