"""Reductions: the gradient is dy broadcast back over the reduced axes (scaled by 1/n for a
mean; for a max, shared among the positions equal to the maximum, as torch.amax does)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, Tensor
from .table import unary


def reduced_axes(b: GradBuilder, node: gs.Node) -> list[int]:
    """Axes from the attribute (older opsets) or the second input (newer), normalised to >= 0."""
    rank = len(b.shape(node.inputs[0]))
    if "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = [int(a) for a in b.constant(node.inputs[1], f"{node.op} axes").reshape(-1)]
    else:
        axes = [] if int(node.attrs.get("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(a % rank for a in axes)


def _spread(b: GradBuilder, node: gs.Node, grad: Tensor, axes: list[int]) -> Tensor:
    """dy with the reduced axes restored (size 1), expanded to the input's shape."""
    shape = b.shape(node.inputs[0])
    if not int(node.attrs.get("keepdims", 1)) and axes:
        grad = b.op("Unsqueeze", [grad, b.ints([a + 1 for a in axes])])
    return b.op("Expand", [grad, b.ints([1, *shape])])


def reduce_sum(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    axes = reduced_axes(b, node)
    return [_spread(b, node, grads[0], axes)]


def reduce_mean(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    axes = reduced_axes(b, node)
    shape = b.shape(node.inputs[0])
    count = float(np.prod([shape[a] for a in axes])) if axes else 1.0
    return [_spread(b, node, b.mul(grads[0], np.float32(1.0 / count)), axes)]


def reduce_max(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    axes = reduced_axes(b, node)
    x, y = node.inputs[0], node.outputs[0]
    if not int(node.attrs.get("keepdims", 1)) and axes:
        y = b.op("Unsqueeze", [y, b.ints(axes)])
    winners = b.to_float(b.op("Equal", [x, y]))
    share = b.op("Div", [winners, b.reduce_sum(winners, axes)])
    return [b.mul(_spread(b, node, grads[0], axes), share)]


OPS = {"ReduceSum": unary(reduce_sum), "ReduceMean": unary(reduce_mean), "ReduceMax": unary(reduce_max)}
