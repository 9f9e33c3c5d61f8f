"""Softmax family (opset >= 13: normalisation along one axis).

softmax:     dx = y * (dy - sum(dy * y))
log-softmax: dx = dy - exp(y) * sum(dy)
with the sums taken along the softmax axis, kept for broadcasting.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..builder import GradBuilder, Tensor
from .table import unary


def _axis(b: GradBuilder, node: gs.Node) -> int:
    rank = len(b.shape(node.inputs[0]))
    return int(node.attrs.get("axis", -1)) % rank


def softmax(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    y = node.outputs[0]
    inner = b.reduce_sum(b.mul(grads[0], y), [_axis(b, node) + 1])
    return [b.mul(y, b.op("Sub", [grads[0], inner]))]


def log_softmax(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    total = b.reduce_sum(grads[0], [_axis(b, node) + 1])
    return [b.op("Sub", [grads[0], b.mul(b.op("Exp", [node.outputs[0]]), total)])]


OPS = {"Softmax": unary(softmax), "LogSoftmax": unary(log_softmax)}
