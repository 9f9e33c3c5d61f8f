"""Decisions other than a class: detections (decoded boxes) and regions of dense maps, each turned
into a seed on a model output (docs/targets.md). Pure numpy: no graph, no session."""

from .detections import (
    Detection,
    DetectionLayout,
    Head,
    ScoreRef,
    decode,
    detect_layout,
    detection_seed,
    nms,
    num_classes,
    score_entries,
)
from .regions import region_seed

__all__ = [
    "Detection",
    "DetectionLayout",
    "Head",
    "ScoreRef",
    "decode",
    "detect_layout",
    "detection_seed",
    "nms",
    "num_classes",
    "region_seed",
    "score_entries",
]
