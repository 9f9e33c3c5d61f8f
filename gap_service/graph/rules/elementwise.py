"""Broadcasting arithmetic. Each input's gradient is summed back over its broadcast axes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from .table import Layout, OpEntry, variadic


def _back(b: GradBuilder, node: gs.Node, index: int, grad: Tensor) -> Tensor:
    return b.unbroadcast(grad, b.shape(node.inputs[index]), b.shape(node.outputs[0]))


def _each_input(term) -> OpEntry:
    """Entry from ``term(b, node, i, dy)``: the un-reduced gradient for input i."""

    def rule(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
        return [
            _back(b, node, i, term(b, node, i, grads[0])) if b.needs_grad(t) else None
            for i, t in enumerate(node.inputs)
        ]

    return variadic(rule, Layout.ELEMENTWISE)


def _sub(b: GradBuilder, node: gs.Node, i: int, dy: Tensor) -> Tensor:
    return dy if i == 0 else b.op("Neg", [dy])


def _mul(b: GradBuilder, node: gs.Node, i: int, dy: Tensor) -> Tensor:
    return b.mul(dy, node.inputs[1 - i])


def _div(b: GradBuilder, node: gs.Node, i: int, dy: Tensor) -> Tensor:
    a, d = node.inputs
    if i == 0:
        return b.op("Div", [dy, d])
    # y = a / d  =>  dy/dd = -y / d
    return b.op("Neg", [b.mul(dy, b.op("Div", [node.outputs[0], d]))])


def _pow(b: GradBuilder, node: gs.Node, i: int, dy: Tensor) -> Tensor:
    if i == 1:
        raise RuleError("Pow with an exponent computed from the explained layer is not supported")
    exponent = b.constant(node.inputs[1], "the exponent of Pow").astype(np.float32)
    return b.mul(dy, b.mul(b.op("Pow", [node.inputs[0], exponent - 1]), exponent))


def _mean(b: GradBuilder, node: gs.Node, i: int, dy: Tensor) -> Tensor:
    return b.mul(dy, np.float32(1.0 / len(node.inputs)))


def _min_max(b: GradBuilder, node: gs.Node, i: int, dy: Tensor) -> Tensor:
    # The winner takes the gradient (ties: every tied input, as the forward value equals each).
    chosen = b.to_float(b.op("Equal", [node.inputs[i], node.outputs[0]]))
    return b.mul(dy, chosen)


OPS = {
    "Add": _each_input(lambda b, node, i, dy: dy),
    "Sum": _each_input(lambda b, node, i, dy: dy),
    "Sub": _each_input(_sub),
    "Mul": _each_input(_mul),
    "Div": _each_input(_div),
    "Pow": _each_input(_pow),
    "Mean": _each_input(_mean),
    "Max": _each_input(_min_max),
    "Min": _each_input(_min_max),
}
