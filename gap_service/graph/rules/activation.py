"""Pointwise activations: dx = dy * f'(x), with f' written from the forward input x or output y.

Mish: y = x t with t = tanh(softplus(x)), so f' = t + x sigmoid(x) (1 - t^2).
Gelu: y = x Phi(x), f' = Phi(x) + x phi(x) (Phi, phi: the normal CDF and density); with
approximate="tanh", y = x (1 + t) / 2 with t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3), so
f' = (1 + t) / 2 + x (1 - t^2) u' / 2 with u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from .table import Layout, OpEntry, unary

Derivative = Callable[[GradBuilder, gs.Node, Tensor, Tensor], Tensor]


def pointwise(derivative: Derivative) -> OpEntry:
    """Entry for y = f(x) given f'(x) as a graph expression of x and y."""

    def rule(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
        x, y = node.inputs[0], node.outputs[0]
        return [b.mul(grads[0], derivative(b, node, x, y))]

    return unary(rule, Layout.ELEMENTWISE)


def _attr(node: gs.Node, name: str, default: float) -> np.float32:
    return np.float32(node.attrs.get(name, default))


def _positive(b: GradBuilder, t: Tensor) -> Tensor:
    return b.op("Greater", [t, np.float32(0)])


def _clip_mask(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor) -> Tensor:
    if any(b.needs_grad(t) for t in node.inputs[1:]):
        raise RuleError("Clip bounds computed from the explained layer are not supported")
    low = b.value(node.inputs[1]) if len(node.inputs) > 1 else None
    high = b.value(node.inputs[2]) if len(node.inputs) > 2 else None
    low = np.float32(node.attrs.get("min", -np.inf)) if low is None and "min" in node.attrs else low
    high = np.float32(node.attrs.get("max", np.inf)) if high is None and "max" in node.attrs else high
    mask = None
    if low is not None:
        mask = b.op("GreaterOrEqual", [x, np.asarray(low, dtype=np.float32)])
    if high is not None:
        upper = b.op("LessOrEqual", [x, np.asarray(high, dtype=np.float32)])
        mask = upper if mask is None else b.op("And", [mask, upper])
    if mask is None:
        return b.const(np.float32(1))
    return b.to_float(mask)


def _prelu_slope(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor) -> Tensor:
    if b.needs_grad(node.inputs[1]):
        raise RuleError("PRelu slope computed from the explained layer is not supported")
    return b.where(_positive(b, x), np.float32(1), node.inputs[1])


def _hard_sigmoid(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor) -> Tensor:
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    inside = b.op("And", [b.op("Greater", [x, -beta / alpha]), b.op("Less", [x, (1 - beta) / alpha])])
    return b.where(inside, alpha, np.float32(0))


def _hard_swish(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor) -> Tensor:
    # y = x * relu6(x + 3) / 6:  0 below -3, 1 above 3, x/3 + 1/2 between.
    middle = b.op("Add", [b.mul(x, np.float32(1 / 3)), np.float32(0.5)])
    upper = b.where(b.op("Greater", [x, np.float32(3)]), np.float32(1), middle)
    return b.where(b.op("Less", [x, np.float32(-3)]), np.float32(0), upper)


def _mish(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor) -> Tensor:
    t = b.op("Tanh", [b.op("Softplus", [x])])
    one_minus_t2 = b.op("Sub", [np.float32(1), b.mul(t, t)])
    return b.op("Add", [t, b.mul(b.mul(x, b.op("Sigmoid", [x])), one_minus_t2)])


_GELU_K = np.float32(np.sqrt(2 / np.pi))
_GELU_C = np.float32(0.044715)


def _gelu(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor) -> Tensor:
    approximate = node.attrs.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate == "tanh":
        x2 = b.mul(x, x)
        t = b.op("Tanh", [b.mul(b.op("Add", [x, b.mul(b.mul(x2, x), _GELU_C)]), _GELU_K)])
        du = b.mul(b.op("Add", [np.float32(1), b.mul(x2, 3 * _GELU_C)]), _GELU_K)
        slope = b.mul(b.mul(x, b.op("Sub", [np.float32(1), b.mul(t, t)])), du)
        return b.mul(b.op("Add", [b.op("Add", [np.float32(1), t]), slope]), np.float32(0.5))
    if approximate != "none":
        raise RuleError(f"Gelu approximate='{approximate}' is not supported")
    cdf = b.mul(b.op("Add", [np.float32(1), b.op("Erf", [b.mul(x, np.float32(1 / np.sqrt(2)))])]), np.float32(0.5))
    density = b.mul(b.op("Exp", [b.mul(b.mul(x, x), np.float32(-0.5))]), np.float32(1 / np.sqrt(2 * np.pi)))
    return b.op("Add", [cdf, b.mul(x, density)])


OPS = {
    "Relu": pointwise(lambda b, n, x, y: b.to_float(_positive(b, y))),
    "LeakyRelu": pointwise(lambda b, n, x, y: b.where(_positive(b, x), np.float32(1), _attr(n, "alpha", 0.01))),
    "PRelu": pointwise(_prelu_slope),
    "Elu": pointwise(lambda b, n, x, y: b.where(_positive(b, x), np.float32(1), b.op("Add", [y, _attr(n, "alpha", 1.0)]))),
    "Selu": pointwise(
        lambda b, n, x, y: b.where(
            _positive(b, x),
            _attr(n, "gamma", 1.0507009873554805),
            b.op("Add", [y, _attr(n, "gamma", 1.0507009873554805) * _attr(n, "alpha", 1.6732632423543772)]),
        )
    ),
    "Clip": pointwise(_clip_mask),
    "Sigmoid": pointwise(lambda b, n, x, y: b.mul(y, b.op("Sub", [np.float32(1), y]))),
    "HardSigmoid": pointwise(_hard_sigmoid),
    "HardSwish": pointwise(_hard_swish),
    "Tanh": pointwise(lambda b, n, x, y: b.op("Sub", [np.float32(1), b.mul(y, y)])),
    "Softplus": pointwise(lambda b, n, x, y: b.op("Sigmoid", [x])),
    "Erf": pointwise(lambda b, n, x, y: b.mul(b.op("Exp", [b.op("Neg", [b.mul(x, x)])]), np.float32(2 / np.sqrt(np.pi)))),
    "Exp": pointwise(lambda b, n, x, y: y),
    "Log": pointwise(lambda b, n, x, y: b.op("Reciprocal", [x])),
    "Abs": pointwise(lambda b, n, x, y: b.op("Sign", [x])),
    "Sqrt": pointwise(lambda b, n, x, y: b.op("Div", [np.float32(0.5), y])),
    "Neg": pointwise(lambda b, n, x, y: b.const(np.float32(-1))),
    "Mish": pointwise(_mish),
    "Gelu": pointwise(_gelu),
}
