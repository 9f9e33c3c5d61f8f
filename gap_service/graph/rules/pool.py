"""Pooling rules.

MaxPool routes each output gradient to the input position that won its window. The forward
MaxPool in the gradient graph is given its optional Indices output, and the gradient is a
scatter-add of dy at those indices (windows overlap, so positions can win several times).

AveragePool is linear: y[o] = sum_{i in window(o)} x[i] / div(o). Its adjoint spreads dy[o]/div(o)
over window(o): a depthwise transposed convolution with an all-ones kernel applied to
dy * (1/div). 1/div(o) depends on pads, ceil_mode and count_include_pad; rather than re-deriving
onnxruntime's rules, it is measured: pooling a ones image gives count(o)/div(o), where count(o)
is the number of real (unpadded) inputs in the window.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from ._geometry import explicit_pads, transpose_padding


def _window(b: GradBuilder, node: gs.Node, x: Tensor):
    in_sizes = list(b.shape(x)[2:])
    out_sizes = list(b.shape(node.outputs[0])[2:])
    spatial = len(in_sizes)
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * spatial))
    dilations = list(node.attrs.get("dilations", [1] * spatial))
    begins, ends = explicit_pads(node.attrs, in_sizes, kernel, strides, dilations)
    return in_sizes, out_sizes, kernel, strides, dilations, begins, ends


def scatter_max_grad(b: GradBuilder, grad: Tensor, indices: Tensor, x_shape: tuple[int, ...]) -> Tensor:
    """Scatter-add dy into zeros shaped like x at the forward argmax indices (flat, batch 1)."""
    if x_shape[0] != 1:
        raise RuleError(f"max pooling needs a forward batch of 1, the input has shape {list(x_shape)}")
    flat = b.op("Reshape", [grad, b.ints([0, -1])])
    index_row = b.op("Reshape", [indices, b.ints([1, -1])])
    index_rows = b.op("Expand", [index_row, b.op("Shape", [flat])])
    zeros = b.zeros_like_grad(grad, (int(np.prod(x_shape)),))
    scattered = b.op("ScatterElements", [zeros, index_rows, flat], {"axis": 1, "reduction": "add"})
    return b.as_grad(scattered, x_shape)


def max_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    if len(node.outputs) == 2 and not node.outputs[1].name:
        node.outputs.pop()
    if len(node.outputs) < 2:
        node.outputs.append(gs.Variable(f"{node.outputs[0].name}__gap_argmax", dtype=np.int64))
    if int(node.attrs.get("storage_order", 0)) != 0:
        node.attrs["storage_order"] = 0  # row-major indices; the values are unaffected
    return [scatter_max_grad(b, grads[0], node.outputs[1], b.shape(node.inputs[0]))]


def global_max_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    spatial = list(b.shape(x)[2:])
    _, indices = b.op("MaxPool", [x], {"kernel_shape": spatial}, outputs=2)
    return [scatter_max_grad(b, grads[0], indices, b.shape(x))]


def average_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    in_sizes, out_sizes, kernel, strides, dilations, begins, ends = _window(b, node, x)
    inverse_divisor = _inverse_divisor(node, in_sizes, kernel, strides, dilations, begins, out_sizes)
    scaled = b.fold_seeds(b.mul(grads[0], inverse_divisor), b.shape(node.outputs[0]), "AveragePool")
    channels = b.shape(x)[1]
    ones = np.ones([channels, 1, *kernel], dtype=b.float_dtype)
    geometry = [transpose_padding(i, o, k, s, d, p) for i, o, k, s, d, p in zip(in_sizes, out_sizes, kernel, strides, dilations, begins)]
    dx = b.op(
        "ConvTranspose",
        [scaled, ones],
        {
            "strides": strides,
            "dilations": dilations,
            "group": channels,
            "pads": [g[0] for g in geometry] + [g[1] for g in geometry],
            "output_padding": [g[2] for g in geometry],
        },
    )
    return [b.as_grad(dx, b.shape(x))]


def _inverse_divisor(node, in_sizes, kernel, strides, dilations, begins, out_sizes) -> np.ndarray:
    """1/div(o) = pool(ones)(o) / count(o), measured with onnxruntime on a one-channel image."""
    from ...runtime import run_single_node

    attrs = {k: v for k, v in node.attrs.items()}
    pooled = run_single_node("AveragePool", attrs, np.ones([1, 1, *in_sizes], dtype=np.float32), node.domain)
    count = np.ones([1], dtype=np.float64)
    for size, out, k, s, d, p in zip(in_sizes, out_sizes, kernel, strides, dilations, begins):
        starts = np.arange(out)[:, None] * s - p + np.arange(k)[None, :] * d
        axis_count = ((starts >= 0) & (starts < size)).sum(axis=1).astype(np.float64)
        count = np.multiply.outer(count, axis_count)
    count = count.reshape(out_sizes)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(count > 0, pooled[0, 0] / count, 0.0)
    return inverse.astype(np.float32)


def global_average_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x_shape = b.shape(node.inputs[0])
    scale = 1.0 / float(np.prod(x_shape[2:]))
    spread = b.op("Expand", [b.mul(grads[0], np.float32(scale)), b.ints([1, *x_shape])])
    return [spread]


RULES = {
    "MaxPool": max_pool,
    "GlobalMaxPool": global_max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
}

