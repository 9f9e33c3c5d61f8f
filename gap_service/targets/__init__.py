"""Decisions other than a class: detections (decoded boxes) and regions of dense maps, each turned
into a seed on a model output, and the task a model's config declares (docs/targets.md). Pure
numpy: no graph, no session."""

from .detections import (
    Detection,
    DetectionLayout,
    Head,
    ScoreRef,
    class_support,
    decode,
    detect_layout,
    detection_seed,
    nms,
    num_classes,
    score_entries,
)
from .regions import region_seed
from .tasks import Task

__all__ = [
    "Detection",
    "DetectionLayout",
    "Head",
    "ScoreRef",
    "class_support",
    "Task",
    "decode",
    "detect_layout",
    "detection_seed",
    "nms",
    "num_classes",
    "region_seed",
    "score_entries",
]
