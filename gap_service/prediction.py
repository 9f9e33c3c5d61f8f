"""What the model predicts: its logits and the top classes with labels and probabilities, or a detector's boxes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

DEFAULT_TOP_CLASSES = 5


class ClassScore(NamedTuple):
    index: int
    label: str
    logit: float
    probability: float  # the model's softmax output, else the softmax of the logits


class DetectedBox(NamedTuple):
    """A box a detector found, as Predict reports it (``targets.decode`` has its raw score entries)."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in input pixels
    class_index: int
    label: str  # empty when the model has no labels
    score: float  # confidence, a probability
    outputs: tuple[str, ...]  # the outputs that hold its score


@dataclass
class Prediction:
    logits: np.ndarray  # the decision output as the model computed it
    classes: list[ClassScore]  # best first; empty when the decision output is not a class vector
    engine_seconds: float = 0.0
    detections: list[DetectedBox] = field(default_factory=list)  # a detector's boxes, best first


def top_classes(logits: np.ndarray, probabilities: np.ndarray | None, labels: tuple[str, ...] | list[str],
                top_k: int) -> list[ClassScore]:
    """The ``top_k`` best classes (all of them when there are fewer), ties in index order."""
    flat = logits.reshape(-1).astype(np.float64)
    if probabilities is not None:
        probs = probabilities.reshape(-1).astype(np.float64)
    else:
        shifted = np.exp(flat - flat.max())
        probs = shifted / shifted.sum()
    order = np.argsort(-flat, kind="stable")[: min(top_k, flat.size)]
    return [ClassScore(int(i), labels[i] if i < len(labels) else "", float(flat[i]), float(probs[i])) for i in order]
