"""Matrix products.

Gemm: Y = alpha * A' B' + beta * C with A' = A or A^T and B' = B or B^T, so
dA' = alpha * dY B'^T (then transposed back when transA), and dC = beta * dY summed over C's
broadcast axes. MatMul: Y = A @ B (batched, broadcasting): dA = dY @ B^T and dB = A^T @ dY,
each summed back over its broadcast batch axes. Gradients carry the seed axis in front, which
MatMul's broadcasting handles like any other batch axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from .table import inputs, variadic


def _swap_last(b: GradBuilder, t: Tensor) -> Tensor:
    """t^T over the last two axes (folded into the constant when t is a weight)."""
    value = b.value(t)
    if value is not None:
        return b.const(np.ascontiguousarray(np.swapaxes(value, -1, -2)))
    rank = len(b.shape(t))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", [t], {"perm": perm})


def _swap_last_grad(b: GradBuilder, grad: Tensor, forward_rank: int) -> Tensor:
    rank = forward_rank + 1
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", [grad], {"perm": perm})


def gemm(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    a, weight = node.inputs[0], node.inputs[1]
    if b.needs_grad(weight):
        raise RuleError("Gemm input B on the gradient path is not supported")
    alpha = np.float32(node.attrs.get("alpha", 1.0))
    beta = np.float32(node.attrs.get("beta", 1.0))
    grad_a = grad_c = None
    if b.needs_grad(a):
        weight_t = weight if int(node.attrs.get("transB", 0)) else _swap_last(b, weight)  # B'^T
        grad_a = b.op("MatMul", [grads[0], weight_t])
        if alpha != 1:
            grad_a = b.mul(grad_a, alpha)
        if int(node.attrs.get("transA", 0)):
            grad_a = _swap_last_grad(b, grad_a, 2)
    if len(node.inputs) > 2 and b.needs_grad(node.inputs[2]):
        scaled = grads[0] if beta == 1 else b.mul(grads[0], beta)
        grad_c = b.unbroadcast(scaled, b.shape(node.inputs[2]), b.shape(node.outputs[0]))
    return [grad_a, grad_c]


def matmul(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    a, m = node.inputs
    a_shape, m_shape = b.shape(a), b.shape(m)
    if len(a_shape) < 2 or len(m_shape) < 2:
        raise RuleError("MatMul with a 1-D operand on the gradient path is not supported")
    batch = b.shape(node.outputs[0])[:-2]
    result: list[Tensor | None] = [None, None]
    if b.needs_grad(a):
        full = b.op("MatMul", [grads[0], _swap_last(b, m)])
        result[0] = b.unbroadcast(full, a_shape, (*batch, *a_shape[-2:]))
    if b.needs_grad(m):
        full = b.op("MatMul", [_swap_last(b, a), grads[0]])
        result[1] = b.unbroadcast(full, m_shape, (*batch, *m_shape[-2:]))
    return result


OPS = {"Gemm": inputs((0, 2), gemm), "MatMul": variadic(matmul)}  # Gemm: A and C (B must be constant)
