"""Effective receptive fields, measured: the part of the field where a unit's input gradient lies.

A unit's receptive field (receptive.py) bounds every pixel it can see, but its input gradient
concentrates in a much smaller central part (Luo et al., "Understanding the Effective Receptive
Field in Deep Convolutional Neural Networks", NeurIPS 2016). On EfficientNet-Lite0 the last
stage's field is 851 px wide, far beyond a 224 px picture, while 50% of the gradient lies within
145 px of its centre (docs/atlas.md). Measured per layer: the mean over a few images of
|d(sum over channels of the centre unit) / d input|, and the side of the smallest square around
the field's centre that holds ``mass`` of it; every unit of the layer gets that square, centred
in its own field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ..explainer import Explainer
from .receptive import AxisField, ReceptiveField, image_axes


def effective_fields(explainer: Explainer, fields: Mapping[str, ReceptiveField], tensors: Sequence[np.ndarray],
                     mass: float) -> dict[str, ReceptiveField]:
    """The effective field of each layer in ``fields``, measured on the input ``tensors``."""
    compiled = explainer.compiled()
    image = explainer.inputs[0].name
    axes = image_axes(compiled.nm, image)
    assert axes is not None, "layers with a receptive field have an image input"
    result = {}
    for name, field in fields.items():
        info = compiled.layer(name)
        centre = tuple(size // 2 for size in info.spatial_shape)
        seeds = np.zeros((1, *info.shape), np.float32)
        index: list[int | slice] = [0, *centre]
        index.insert(info.channel_axis, slice(None))
        seeds[(0, *index)] = 1.0
        gradient = np.sum([np.abs(explainer.vjp(x, name, image, seeds)[0]) for x in tensors], axis=0)  # input shape
        plane = np.moveaxis(gradient, axes, (0, 1)).reshape(gradient.shape[axes[0]], gradient.shape[axes[1]], -1).sum(-1)
        row, col = (centre[1], centre[0]) if field.transposed else centre
        side = _side(plane, _middle(field.rows, row), _middle(field.cols, col), mass)
        result[name] = replace(field, rows=_shrink(field.rows, side), cols=_shrink(field.cols, side))
    return result


def _middle(axis: AxisField, unit: int) -> float:
    low, high = axis.window(unit)
    return (low + high - 1) / 2


def _side(plane: np.ndarray, cy: float, cx: float, mass: float) -> int:
    """Side of the smallest square centred at (cy, cx) holding ``mass`` of ``plane``."""
    ys, xs = np.indices(plane.shape)
    radius = np.maximum(np.abs(ys - cy), np.abs(xs - cx)).ravel()
    order = np.argsort(radius, kind="stable")
    cumulative = np.cumsum(plane.ravel()[order])
    reached = min(int(np.searchsorted(cumulative, mass * cumulative[-1])), len(order) - 1)
    return math.ceil(2 * radius[order[reached]] + 1)


def _shrink(axis: AxisField, side: int) -> AxisField:
    size = min(side, axis.size)
    return AxisField(size, axis.jump, axis.start + (axis.size - size) // 2)
