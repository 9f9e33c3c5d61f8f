"""What the model predicts: its logits and the top classes with labels and probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DEFAULT_TOP_CLASSES = 5


class ClassScore(NamedTuple):
    index: int
    label: str
    logit: float
    probability: float  # the model's softmax output, else the softmax of the logits


@dataclass
class Prediction:
    logits: np.ndarray
    classes: list[ClassScore]  # best first
    engine_seconds: float = 0.0


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
