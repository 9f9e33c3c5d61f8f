"""The few lines of math that distinguish gAP, Grad-CAM and LayerCAM.

All of them start from the same two arrays for one decision: G, the gradient of the decision
with respect to a layer's activation A, and A itself, both laid out [channels, *spatial].
"""

from __future__ import annotations

import numpy as np

SCORE_MODES = ("net", "positive")


def contribution(grad: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """C = G * A, the first-order share of the decision carried by every unit."""
    return grad * activation


def channel_scores(contrib: np.ndarray, mode: str) -> np.ndarray:
    """s_k: the net sum of C[k] ("net") or the sum of its positive part ("positive").

    ``contrib`` is [..., channels, *spatial] with two spatial axes.
    """
    if mode == "net":
        return contrib.sum(axis=(-2, -1))
    if mode == "positive":
        return np.maximum(contrib, 0).sum(axis=(-2, -1))
    raise ValueError(f"score mode '{mode}' is not one of {SCORE_MODES}")


def supporting_channels(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the top_k channels with positive score, best first; ties: lower index first."""
    positive = np.flatnonzero(scores > 0)
    order = positive[np.lexsort((positive, -scores[positive]))]
    return order[:top_k]


def grad_cam(grad: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """Grad-CAM: ReLU(sum_k mean(G[k]) * A[k])."""
    weights = grad.mean(axis=(-2, -1), keepdims=True)
    return np.maximum((weights * activation).sum(axis=-3), 0)


def layer_cam(grad: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """LayerCAM: ReLU(sum_k ReLU(G[k]) * A[k])."""
    return np.maximum((np.maximum(grad, 0) * activation).sum(axis=-3), 0)


def gap_map(grad: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """gAP's layer map of a decision: ReLU(sum_k C[k])."""
    return np.maximum(contribution(grad, activation).sum(axis=-3), 0)


CAM_METHODS = {"gradcam": grad_cam, "layercam": layer_cam, "gap": gap_map}
