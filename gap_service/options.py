"""The one options type of an explanation: its defaults and its validation, for library, CLI and server.

Field paths in errors are the ones a request names them by (``options.top_k``,
``options.target.detection.index``), so a bad value reads the same from Python, from the command
line and over gRPC. What is explained is a scalar ``<seed, output>`` of one model output
(docs/targets.md): a ``target`` of one of the kinds below builds the seed, or ``seed`` gives it.
Checks that need the model (an output's shape, the number of detections) happen when the target
is resolved for an input; everything else is checked here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FieldViolation, raise_violations
from .methods import SCORE_MODES

MAX_TOP_K = 64
PRECISIONS = ("float32", "float16")
TARGET = "options.target"


@dataclass(frozen=True)
class DetectionTarget:
    """Detection ``index`` of the decoded boxes (``Explainer.detections``, best first): its class
    score at its anchor (with objectness for YOLOv5). ``class_index`` explains that box's score for
    another class; ``spread`` adds the anchors NMS merged into the box, weighted by their IoU."""

    index: int = 0
    class_index: int | None = None
    spread: bool = False


@dataclass(frozen=True)
class RegionTarget:
    """The sum of one channel of a dense output over a region (pytorch-grad-cam's
    SemanticSegmentationTarget): a ``box`` x1, y1, x2, y2 in the map's own pixels, or a ``mask``
    [H, W] of weights; the whole map when neither is given."""

    channel: int = 0
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ElementTarget:
    """One element of the output, by its full index (``output0[0, 84, 123]``)."""

    index: tuple[int, ...]


# A class index (the logit of a class vector), or one of the target kinds above.
Target = int | DetectionTarget | RegionTarget | ElementTarget


@dataclass(frozen=True)
class ExplainOptions:
    """What is decomposed, and how far."""

    layers: tuple[str, ...] | None = None  # None: found from the explained output (and seed)
    target: Target | None = None  # None: the model's task default (a classifier's top-1 class)
    output: str | None = None  # the output the target or seed lies on; None: the model's decision output
    seed: np.ndarray | None = field(default=None, compare=False)  # a custom decision <seed, output>
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
        found.extend(target_violations(self.target))
        if self.seed is not None:
            found.extend(seed_violations(self.seed))
            if self.target is not None:
                bad("seed", "give a seed or a target, not both")
        if self.output is not None and not self.output:
            bad("output", "is empty")
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

    def worst_case_nodes(self, limit: int | None = None) -> int:
        """Most nodes a tree of these options can have; counting stops once past ``limit``, so a
        request with a huge depth costs nothing to judge."""
        total, level_nodes = 0, 1
        for _ in range(self.depth + 1):
            total += level_nodes
            if limit is not None and total > limit:
                break
            level_nodes *= self.top_k
        return total


def target_violations(target: object) -> list[FieldViolation]:
    """What is wrong with a target on its own (its fit to the model is checked when it is resolved)."""
    def bad(field: str, description: str) -> list[FieldViolation]:
        return [FieldViolation(f"{TARGET}.{field}", description)]

    if target is None:
        return []
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer, DetectionTarget, RegionTarget,
                                                                         ElementTarget)):
        return [FieldViolation(TARGET, f"{type(target).__name__} is not a class index, DetectionTarget, RegionTarget "
                                       "or ElementTarget")]
    if isinstance(target, (int, np.integer)):
        return bad("class_index", f"{target} must not be negative") if target < 0 else []
    if isinstance(target, DetectionTarget):
        found = bad("detection.index", f"{target.index} must not be negative") if target.index < 0 else []
        if target.class_index is not None and target.class_index < 0:
            found += bad("detection.class_index", f"{target.class_index} must not be negative")
        return found
    if isinstance(target, RegionTarget):
        found = bad("region.channel", f"{target.channel} must not be negative") if target.channel < 0 else []
        if target.box is not None and target.mask is not None:
            found += bad("region", "give a box or a mask, not both")
        if target.box is not None:
            box = np.asarray(target.box, np.float64).ravel()
            if box.shape != (4,) or not np.isfinite(box).all() or box[0] >= box[2] or box[1] >= box[3]:
                found += bad("region.box", f"{list(box)} is not four finite numbers x1 < x2, y1 < y2")
        if target.mask is not None:
            mask = np.asarray(target.mask)
            if mask.ndim != 2:
                found += bad("region.mask", f"has shape {list(mask.shape)}; a mask is [H, W]")
            elif mask.dtype != bool and not np.issubdtype(mask.dtype, np.number):
                found += bad("region.mask", f"dtype {mask.dtype} is not boolean or numeric")
            elif not np.isfinite(mask.astype(np.float64)).all():
                found += bad("region.mask", "holds NaN or infinite values")
            elif not mask.any():
                found += bad("region.mask", "is zero everywhere: it selects nothing to explain")
        return found
    index = target.index
    if not isinstance(index, (tuple, list)) or not index or any(
            isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or i < 0 for i in index):
        return bad("element.index", f"{index!r} is not a sequence of non-negative integers")
    return []


def seed_violations(seed: object) -> list[FieldViolation]:
    """A seed must be a finite, non-zero numeric array (its shape is checked against the output)."""
    values = np.asarray(seed)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        return [FieldViolation("options.seed", f"dtype {values.dtype} is not a real number type")]
    if not np.isfinite(values).all():
        return [FieldViolation("options.seed", "holds NaN or infinite values")]
    if not values.any():
        return [FieldViolation("options.seed", "is zero everywhere: it selects nothing to explain")]
    return []
