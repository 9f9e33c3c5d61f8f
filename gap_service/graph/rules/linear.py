"""Matrix products.

Gemm: Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T. With the batch on A's rows,
dA = alpha * dY B'^T (a Gemm again) and dC = beta * dY summed over C's broadcast axes.
MatMul: Y = A @ B (batched, broadcasting): dA = dY @ B^T, dB = A^T @ dY, each summed back over
its broadcast batch axes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor


def gemm(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    a, weight = node.inputs[0], node.inputs[1]
    if b.needs_grad(weight):
        raise RuleError("Gemm input B on the gradient path is not supported")
    if int(node.attrs.get("transA", 0)):
        raise RuleError("Gemm with transA=1 puts the batch on columns; not supported on a gradient path")
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    trans_b = int(node.attrs.get("transB", 0))
    result: list[Tensor | None] = [None] * len(node.inputs)
    if b.needs_grad(a):
        result[0] = b.op("Gemm", [grads[0], weight], {"alpha": alpha, "transB": 1 - trans_b})
    if len(node.inputs) > 2 and b.needs_grad(node.inputs[2]):
        scaled = grads[0] if beta == 1.0 else b.mul(grads[0], np.float32(beta))
        result[2] = b.unbroadcast(scaled, b.shape(node.inputs[2]), b.shape(node.outputs[0]))
    return result


def _swap_last(b: GradBuilder, t: Tensor) -> Tensor:
    value = b.value(t)
    if value is not None:
        return b.const(np.ascontiguousarray(np.swapaxes(value, -1, -2)))
    rank = len(b.shape(t))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", [t], {"perm": perm})


def matmul(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    a, m = node.inputs
    if len(b.shape(a)) < 2 or len(b.shape(m)) < 2:
        raise RuleError("MatMul with a 1-D operand on the gradient path is not supported")
    out_shape = b.shape(node.outputs[0])
    result: list[Tensor | None] = [None, None]
    if b.needs_grad(a):
        result[0] = _sum_to(b, b.op("MatMul", [grads[0], _swap_last(b, m)]), b.shape(a), out_shape)
    if b.needs_grad(m):
        result[1] = _sum_to(b, b.op("MatMul", [_swap_last(b, a), grads[0]]), b.shape(m), out_shape)
    return result


def _sum_to(b: GradBuilder, grad: Tensor, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Tensor:
    """Reduce batch axes of a MatMul operand gradient that were broadcast in the forward product."""
    if len(shape) != len(out_shape):
        raise RuleError(f"MatMul operand of rank {len(shape)} broadcast to rank {len(out_shape)} on a gradient path")
    axes = [ax for ax in range(1, len(shape) - 2) if shape[ax] == 1 and out_shape[ax] != 1]
    return b.reduce_sum(grad, axes) if axes else grad


RULES = {"Gemm": gemm, "MatMul": matmul}
