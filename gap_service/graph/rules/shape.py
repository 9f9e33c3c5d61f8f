"""Data-movement ops: their gradients move dy back to where each input element went.

Reshape-like ops reshape dy back; Transpose applies the inverse permutation; Concat slices dy;
Split concatenates; Expand sums over the expanded axes. Ops that select or repeat positions
along an axis (Slice with steps, Gather, Pad, whatever its mode) are linear maps along that axis,
out = M x with a 0/1 matrix M; their adjoint is M^T applied along the same axis. Plain slices
and constant pads use the cheaper Pad/Slice instead.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from .table import Layout, unary, variadic


def reshape_back(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    return [b.as_grad(grads[0], b.shape(node.inputs[0]))]


def identity(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    return [grads[0]]


def transpose(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    rank = len(b.shape(node.inputs[0]))
    perm = list(node.attrs.get("perm", list(reversed(range(rank)))))
    inverse = [int(a) + 1 for a in np.argsort(perm)]
    return [b.op("Transpose", [grads[0]], {"perm": [0, *inverse]})]


def concat(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    rank = len(b.shape(node.outputs[0]))
    axis = int(node.attrs["axis"]) % rank
    result: list[Tensor | None] = []
    offset = 0
    for t in node.inputs:
        size = b.shape(t)[axis]
        if b.needs_grad(t):
            bounds = [b.ints([offset]), b.ints([offset + size]), b.ints([axis + 1])]
            result.append(b.op("Slice", [grads[0], *bounds]))
        else:
            result.append(None)
        offset += size
    return result


def split(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    rank = len(b.shape(node.inputs[0]))
    axis = int(node.attrs.get("axis", 0)) % rank
    like = next(g for g in grads if g is not None)
    pieces = [
        g if g is not None else b.zeros_like_grad(like, b.shape(out))
        for g, out in zip(grads, node.outputs)
    ]
    return [b.op("Concat", pieces, {"axis": axis + 1})]


def expand(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    return [b.unbroadcast(grads[0], b.shape(node.inputs[0]), b.shape(node.outputs[0]))]


def tile(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    shape = b.shape(node.inputs[0])
    repeats = [int(r) for r in b.constant(node.inputs[1], "Tile repeats")]
    # [P, r0*s0, r1*s1, ...] -> [P, r0, s0, r1, s1, ...] -> sum over the repeat axes.
    split_shape = [-1] + [v for r, s in zip(repeats, shape) for v in (r, s)]
    regrouped = b.op("Reshape", [grads[0], b.ints(split_shape)])
    return [b.reduce_sum(regrouped, list(range(1, 2 * len(shape), 2)), keepdims=False)]


def _selection(indices: np.ndarray, size: int) -> np.ndarray:
    """M[o, i] = number of times output o reads input i (one-hot rows)."""
    matrix = np.zeros([len(indices), size], dtype=np.float32)
    matrix[np.arange(len(indices)), indices] = 1.0
    return matrix


def slice_(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    shape = b.shape(x)
    rank = len(shape)
    starts = b.constant(node.inputs[1], "Slice starts").reshape(-1)
    ends = b.constant(node.inputs[2], "Slice ends").reshape(-1)
    axes = b.constant(node.inputs[3], "Slice axes").reshape(-1) if len(node.inputs) > 3 and node.inputs[3].name else np.arange(len(starts))
    steps = b.constant(node.inputs[4], "Slice steps").reshape(-1) if len(node.inputs) > 4 and node.inputs[4].name else np.ones(len(starts), np.int64)
    grad = grads[0]
    pads_begin, pads_end = [0] * rank, [0] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        kept = np.arange(shape[axis])[slice(int(start), int(end), int(step))]
        if int(step) == 1 and len(kept):
            pads_begin[axis], pads_end[axis] = int(kept[0]), int(shape[axis] - kept[-1] - 1)
        else:
            grad = b.along_axis(grad, _selection(kept, shape[axis]).T, axis + 1, rank + 1)
    if any(pads_begin) or any(pads_end):
        grad = b.op("Pad", [grad, b.ints([0, *pads_begin, 0, *pads_end])], {"mode": "constant"})
    return [grad]


def gather(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    shape = b.shape(x)
    rank = len(shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    indices = b.constant(node.inputs[1], "Gather indices").astype(np.int64)
    flat = np.where(indices < 0, indices + shape[axis], indices).reshape(-1)
    out_shape = list(shape[:axis]) + [len(flat)] + list(shape[axis + 1:])
    grad = b.as_grad(grads[0], out_shape)
    return [b.along_axis(grad, _selection(flat, shape[axis]).T, axis + 1, rank + 1)]


def _pad_index(out_len: int, in_len: int, begin: int, mode: str) -> np.ndarray:
    """For each output position along an axis, the input position it copies (-1: a constant)."""
    positions = np.arange(out_len) - begin
    if mode == "constant":
        return np.where((positions >= 0) & (positions < in_len), positions, -1)
    if mode == "edge":
        return np.clip(positions, 0, in_len - 1)
    if mode == "reflect":
        period = 2 * (in_len - 1)
        if period == 0:
            return np.zeros_like(positions)
        folded = np.mod(positions, period)
        return np.where(folded < in_len, folded, period - folded)
    raise RuleError(f"Pad mode '{mode}' is not supported")


def pad(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    shape = b.shape(x)
    out_shape = b.shape(node.outputs[0])
    rank = len(shape)
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = b.constant(node.inputs[1], "Pad pads").reshape(-1).astype(int) if len(node.inputs) > 1 else np.asarray(node.attrs["pads"])
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = [int(a) % rank for a in b.constant(node.inputs[3], "Pad axes").reshape(-1)]
    else:
        axes = list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = int(pads[i]), int(pads[i + len(axes)])
    grad = grads[0]
    if mode == "constant" and min(begins + ends) >= 0:
        stops = [start + size for start, size in zip(begins, shape)]
        grad = b.op("Slice", [grad, b.ints(begins), b.ints(stops), b.ints(range(1, rank + 1))])
    else:
        for axis in range(rank):
            if begins[axis] == 0 and ends[axis] == 0:
                continue
            index = _pad_index(out_shape[axis], shape[axis], begins[axis], mode)
            matrix = np.zeros([out_shape[axis], shape[axis]], dtype=np.float32)
            rows = np.nonzero(index >= 0)[0]
            np.add.at(matrix, (rows, index[rows]), 1.0)
            grad = b.along_axis(grad, matrix.T, axis + 1, rank + 1)
    return [grad]


# Reshape-like copies keep the values in order (a Softmax output stays the probabilities).
_RESHAPE = Layout.COPY | Layout.SAME_ORDER
_IDENTITY = Layout.COPY | Layout.SAME_ORDER | Layout.ELEMENTWISE

OPS = {
    "Reshape": unary(reshape_back, _RESHAPE),
    "Flatten": unary(reshape_back, _RESHAPE),
    "Squeeze": unary(reshape_back, _RESHAPE),
    "Unsqueeze": unary(reshape_back, _RESHAPE),
    "Identity": unary(identity, _IDENTITY),
    "Dropout": unary(identity, _IDENTITY),
    "Cast": unary(identity, _IDENTITY),
    "Transpose": unary(transpose, Layout.COPY),
    "Concat": variadic(concat),
    "Split": unary(split),
    "Expand": unary(expand),
    "Tile": unary(tile),
    "Slice": unary(slice_, Layout.COPY),
    "Gather": unary(gather),
    "Pad": unary(pad, Layout.COPY),  # where a Pad feeds a conv, the layer is the Pad's input
}
