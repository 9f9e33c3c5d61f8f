"""What a model's outputs mean, as config.json's ``task`` declares it (docs/targets.md): which
decision an explanation without a target decomposes, and how a detector's outputs are decoded.

- ``{"kind": "classification"}``: the decision output is a class vector; the default target is
  the top-1 class.
- ``{"kind": "detection", "layout": ..., ...}``: the keys of ``DetectionLayout.from_config`` plus
  the decoding thresholds ``score_threshold``, ``iou_threshold`` and ``max_detections``; the
  default target is the best detection.
- ``{"kind": "dense", "output": NAME, "channel": C}``: a dense map (segmentation, text
  probability, depth); the default target is the whole of channel C of that output (default:
  the decision output, channel 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import invalid
from .detections import DetectionLayout

TaskKind = Literal["classification", "detection", "dense"]
_THRESHOLDS = {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100}


@dataclass(frozen=True)
class Task:
    """A model's task: its kind and what explaining or decoding it needs."""

    kind: TaskKind = "classification"
    detection: DetectionLayout | None = None  # detection: how to decode the outputs
    output: str | None = None  # dense: the map a default explanation decomposes
    channel: int = 0  # dense: its channel
    score_threshold: float = _THRESHOLDS["score_threshold"]
    iou_threshold: float = _THRESHOLDS["iou_threshold"]
    max_detections: int = _THRESHOLDS["max_detections"]
    declared: bool = True  # False: detected from the output shapes (detections.detect_layout)

    def __post_init__(self) -> None:
        if self.kind not in get_args(TaskKind):
            raise invalid("task.kind", f"'{self.kind}' is not one of {', '.join(get_args(TaskKind))}")
        if (self.kind == "detection") != (self.detection is not None):
            raise invalid("task.layout", "a detection task, and only one, has a detection layout")
        if self.channel < 0:
            raise invalid("task.channel", f"{self.channel} must not be negative")

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> Task:
        """The task of a config.json ``task`` object; every problem names its key (``task.layout``)."""
        if not isinstance(data, Mapping):
            raise invalid("task", "must be an object such as {\"kind\": \"detection\", \"layout\": \"yolov8\", ...}")
        kind = data.get("kind")
        if kind == "detection":
            thresholds = {key: data[key] for key in _THRESHOLDS if key in data}
            layout = DetectionLayout.from_config({k: v for k, v in data.items() if k not in _THRESHOLDS})
            return cls("detection", layout, **thresholds)
        allowed = {"kind"} | ({"output", "channel"} if kind == "dense" else set())
        if unknown := set(data) - allowed:
            raise invalid("task", f"unknown keys {sorted(unknown)} for a {kind} task; known keys are {sorted(allowed)}")
        return cls(kind, output=data.get("output"), channel=int(data.get("channel", 0)))  # type: ignore[arg-type]
