"""Pooling rules.

MaxPool routes each output gradient to the input position that won its window. The forward
MaxPool in the gradient graph is given its optional Indices output (``with_argmax``, the entry's
forward preparation), and the gradient is a scatter-add of dy at those indices (windows overlap,
so positions can win several times).

AveragePool is linear: y[o] = sum_{i in window(o)} x[i] / div(o). Its adjoint spreads dy[o]/div(o)
over window(o): a depthwise transposed convolution with an all-ones kernel applied to
dy * (1/div). The window is a box, so div(o) is a product over the spatial axes of the taps
counted along each (``counted_taps``): with count_include_pad=0 the taps on real inputs, with
count_include_pad=1 also those on the pads, but never taps past the end pad, which ceil_mode
windows can reach (the ONNX reference's rule; the tests check it against onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from ._geometry import explicit_pads, window_attrs
from .conv import conv_input_grad
from .table import Layout, no_rule, unary


def _window(b: GradBuilder, node: gs.Node, x: Tensor):
    in_sizes = list(b.shape(x)[2:])
    out_sizes = list(b.shape(node.outputs[0])[2:])
    spatial = len(in_sizes)
    kernel = list(node.attrs["kernel_shape"])
    strides, dilations = window_attrs(node.attrs, spatial, kernel)
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


def with_argmax(node: gs.Node) -> None:
    """Forward preparation: the gradient graph's MaxPool also returns its row-major argmax."""
    if len(node.outputs) == 2 and not node.outputs[1].name:
        node.outputs.pop()
    if len(node.outputs) < 2:
        node.outputs.append(gs.Variable(f"{node.outputs[0].name}__gap_argmax", dtype=np.int64))
    if int(node.attrs.get("storage_order", 0)) != 0:
        node.attrs["storage_order"] = 0  # row-major indices; the values are unaffected


def max_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    return [scatter_max_grad(b, grads[0], node.outputs[1], b.shape(node.inputs[0]))]  # Indices: with_argmax


def global_max_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    spatial = list(b.shape(x)[2:])
    _, indices = b.op("MaxPool", [x], {"kernel_shape": spatial}, outputs=2)
    return [scatter_max_grad(b, grads[0], indices, b.shape(x))]


def average_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    in_sizes, out_sizes, kernel, strides, dilations, begins, ends = _window(b, node, x)
    include_pad = bool(int(node.attrs.get("count_include_pad", 0)))
    inverse = inverse_divisor(in_sizes, out_sizes, kernel, strides, dilations, begins, ends, include_pad)
    scaled = b.fold_seeds(b.mul(grads[0], inverse), b.shape(node.outputs[0]), "AveragePool")
    channels = b.shape(x)[1]
    ones = b.const(np.ones([channels, 1, *kernel]))  # no weight value given: the transposed-convolution form
    dx = conv_input_grad(b, scaled, ones, None, channels, in_sizes, out_sizes, strides, dilations, begins, ends)
    return [b.as_grad(dx, b.shape(x))]


def counted_taps(in_size: int, out_size: int, kernel: int, stride: int, dilation: int, begin: int, end: int,
                 include_pad: bool) -> np.ndarray:
    """Per output position along one axis, the window taps AveragePool divides by.

    Tap j of window o reads input position o*s - begin + j*d. Real inputs lie in [0, in_size),
    pads extend that to [-begin, in_size + end); taps beyond (ceil_mode) are never counted.
    """
    taps = np.arange(out_size)[:, None] * stride - begin + np.arange(kernel)[None, :] * dilation
    low = -begin if include_pad else 0
    high = in_size + end if include_pad else in_size
    return ((taps >= low) & (taps < high)).sum(axis=1)


def inverse_divisor(in_sizes, out_sizes, kernel, strides, dilations, begins, ends, include_pad: bool) -> np.ndarray:
    """1/div(o) over the output grid (0 where a window counts nothing: no input reaches it)."""
    divisor = np.ones([1], dtype=np.float64)
    for axis in zip(in_sizes, out_sizes, kernel, strides, dilations, begins, ends):
        divisor = np.multiply.outer(divisor, counted_taps(*axis, include_pad))
    divisor = divisor.reshape(out_sizes)
    with np.errstate(divide="ignore"):
        return np.where(divisor > 0, 1.0 / divisor, 0.0).astype(np.float32)


def global_average_pool(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x_shape = b.shape(node.inputs[0])
    scale = 1.0 / float(np.prod(x_shape[2:]))
    spread = b.op("Expand", [b.mul(grads[0], np.float32(scale)), b.ints([1, *x_shape])])
    return [spread]


_POOLED = Layout.NCHW | Layout.POOLING

OPS = {
    "MaxPool": unary(max_pool, _POOLED, prepare=with_argmax),
    "GlobalMaxPool": unary(global_max_pool, Layout.NCHW),
    "AveragePool": unary(average_pool, _POOLED),
    "GlobalAveragePool": unary(global_average_pool, Layout.NCHW),
    "LpPool": no_rule(_POOLED),
    "GlobalLpPool": no_rule(Layout.NCHW),
}
