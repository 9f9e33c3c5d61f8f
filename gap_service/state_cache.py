"""The forward-state cache: what a second request on the same input need not compute again.

An explorer's clicks are Expand requests on the input it explained a moment ago. Without a
cache each one reruns the forward pass and decomposes every node of the path again; with it,
a click costs one level run: the forward activations of an input are kept (keyed by the
compiled model and a digest of its feeds), and so is every node the engine made for it (keyed
by the tree's root seed and the options that shape the tree, then by the node's path), with its
seed still on the execution device.

One cache per process (a server replica shares it between its models), bounded in bytes: the
least recently used inputs are dropped first. Entries only grow (a node once computed never
changes), so sharing them between threads needs no more than the cache's lock.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

DEFAULT_STATE_CACHE_BYTES = 256 * 2**20

# Element sizes of the OrtValue types a forward run returns.
_ITEM_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(double)": 8, "tensor(int64)": 8,
               "tensor(int32)": 4, "tensor(int8)": 1, "tensor(uint8)": 1, "tensor(bool)": 1}

_model_tokens = itertools.count(1)


def model_token() -> int:
    """A number no other compiled model of this process has (an id() could be reused after GC)."""
    return next(_model_tokens)


def nbytes(value: ort.OrtValue) -> int:
    return int(np.prod(value.shape(), dtype=np.int64)) * _ITEM_BYTES.get(value.data_type(), 4)


def digest(*arrays: np.ndarray) -> bytes:
    """A digest of arrays: their shapes, dtypes and bytes."""
    hasher = hashlib.blake2b(digest_size=20)
    for array in arrays:
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.dtype.str}{array.shape};".encode())
        hasher.update(array.data)
    return hasher.digest()


def feeds_digest(feeds: Mapping[str, np.ndarray]) -> bytes:
    hasher = hashlib.blake2b(digest_size=20)
    for name in sorted(feeds):
        hasher.update(name.encode() + b"\0" + digest(feeds[name]))
    return hasher.digest()


@dataclass
class CachedNode:
    """One node's values (as Node has them) and, where it was computed, its seed: row ``row`` of
    the batch of seeds it was made in (kept whole: one batch, many nodes)."""

    layer: str
    channel: int
    score: float
    share: float
    map: np.ndarray
    seeds: ort.OrtValue | None = None
    row: int = 0


@dataclass
class TreeMemo:
    """The nodes computed for one decision of one input under one set of tree-shaping options:
    the root's maps (its gAP map and CAMs) and every node by path."""

    root_map: np.ndarray | None = None
    cams: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: dict[tuple[int, ...], CachedNode] = field(default_factory=dict)

    def seeded_prefix(self, path: Sequence[int]) -> int:
        """Length of the longest prefix of ``path`` whose nodes are all known, the last one with
        its seed (0: start at the root)."""
        known = 0
        for length in range(1, len(path) + 1):
            if tuple(path[:length]) not in self.nodes:
                break
            if self.nodes[tuple(path[:length])].seeds is not None:
                known = length
        return known if self.root_map is not None else 0


@dataclass
class CachedInput:
    """Everything kept for one input of one compiled model."""

    key: Hashable
    state: dict[str, ort.OrtValue]
    trees: dict[Hashable, TreeMemo] = field(default_factory=dict)
    state_bytes: int = 0
    node_bytes: int = 0  # node maps, seed batches, root maps

    @property
    def bytes(self) -> int:
        return self.state_bytes + self.node_bytes


class StateCache:
    """Forward state and computed nodes per (compiled model, input digest), bounded in bytes (LRU)."""

    def __init__(self, max_bytes: int = DEFAULT_STATE_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, CachedInput] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        """Bytes held now (never more than ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedInput | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, state: Mapping[str, ort.OrtValue]) -> CachedInput:
        """Keep ``state`` for ``key``, merged into what is kept already; the entry to add nodes to.
        An entry larger than the whole cache is returned (for this request) but not kept."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = CachedInput(key, {})
            else:
                self._entries.move_to_end(key)
            merged = {**entry.state, **state}
            size = sum(nbytes(value) for value in merged.values())
            entry.state = merged
            self._grow(entry, size - entry.state_bytes, state=True)
            return entry

    def tree(self, entry: CachedInput, key: Hashable) -> TreeMemo:
        with self._lock:
            return entry.trees.setdefault(key, TreeMemo())

    def add_node(self, entry: CachedInput, tree: TreeMemo, path: tuple[int, ...], node: CachedNode,
                 new_batch: bool) -> None:
        """Remember ``node``; ``new_batch``: its seed batch is not counted yet (the batch's first node)."""
        added = node.map.nbytes + (nbytes(node.seeds) if new_batch and node.seeds is not None else 0)
        with self._lock:
            if path not in tree.nodes:
                tree.nodes[path] = node
                self._grow(entry, added)

    def add_root(self, entry: CachedInput, tree: TreeMemo, root_map: np.ndarray, cams: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            if tree.root_map is None:
                tree.root_map, tree.cams = root_map, dict(cams)
                self._grow(entry, root_map.nbytes + sum(cam.nbytes for cam in cams.values()))

    def _grow(self, entry: CachedInput, added: int, state: bool = False) -> None:
        """Count ``added`` bytes of ``entry`` (lock held), then drop the oldest entries while over."""
        if state:
            entry.state_bytes += added
        else:
            entry.node_bytes += added
        if self._entries.get(entry.key) is not entry:  # evicted meanwhile: its growth is not held
            return
        self._bytes += added
        while self._bytes > self.max_bytes and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.bytes
            self.evictions += 1
