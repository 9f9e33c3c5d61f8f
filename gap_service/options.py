"""The one options type of an explanation: its defaults and its validation, for library, CLI and server.

Field paths in errors are the ones a request names them by (``options.top_k``), so a bad value
reads the same from Python, from the command line and over gRPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import FieldViolation, raise_violations
from .methods import SCORE_MODES

MAX_TOP_K = 64
PRECISIONS = ("float32", "float16")


@dataclass(frozen=True)
class ExplainOptions:
    """What is decomposed, and how far."""

    layers: tuple[str, ...] | None = None  # None: the model's default chain
    target: int | None = None  # None: the top-1 class
    top_k: int = 5
    depth: int = 3
    min_share: float = 0.0
    score: str = "net"
    max_batch_bytes: int | None = None  # None: the execution device's default (engine.DEFAULT_BATCH_BYTES)
    seeds_per_run: int | None = None  # None: as many as the memory bound allows; 1: no level batching
    precision: str = "float32"  # "float16": gradient graphs compute in half precision (for CUDA)
    # Decompose only along these channels first (an Expand of one node); ``depth`` counts them too.
    root_path: tuple[int, ...] = ()

    def violations(self) -> list[FieldViolation]:
        """Every bad field at once (not just the first)."""
        found: list[FieldViolation] = []

        def bad(field: str, description: str) -> None:
            found.append(FieldViolation(f"options.{field}", description))

        if not 1 <= self.top_k <= MAX_TOP_K:
            bad("top_k", f"{self.top_k} is out of range [1, {MAX_TOP_K}]")
        if self.depth < 1:
            bad("depth", f"{self.depth} must be at least 1")
        if self.target is not None and self.target < 0:
            bad("target", f"{self.target} must not be negative")
        if math.isnan(self.min_share) or not 0.0 <= self.min_share < 1.0:
            bad("min_share", f"{self.min_share} is out of range [0, 1)")
        if self.score not in SCORE_MODES:
            bad("score", f"'{self.score}' is not one of {list(SCORE_MODES)}")
        if self.max_batch_bytes is not None and self.max_batch_bytes <= 0:
            bad("max_batch_bytes", "must be positive")
        if self.seeds_per_run is not None and self.seeds_per_run < 1:
            bad("seeds_per_run", "must be at least 1")
        if self.precision not in PRECISIONS:
            bad("precision", f"'{self.precision}' is not one of {list(PRECISIONS)}")
        for index, name in enumerate(self.layers or ()):
            if not name:
                bad(f"layers[{index}]", "is empty")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            bad("layers", "names a layer twice")
        found.extend(FieldViolation(f"path[{i}]", f"channel {c} must not be negative")
                     for i, c in enumerate(self.root_path) if c < 0)
        return found

    def validate(self) -> None:
        raise_violations(self.violations())

    def worst_case_nodes(self) -> int:
        """Most nodes a tree of these options can have."""
        return sum(self.top_k**level for level in range(self.depth + 1))
