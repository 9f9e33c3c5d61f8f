"""Convolution rules.

Conv: y = conv(x, W) with strides s, dilations d, pads p, groups g. Its adjoint in x is the
transposed convolution of dy with the same W, s, d, p, g, cropped or zero-extended to x's size
(``transpose_padding``). For stride 1 the transposed convolution is itself a convolution: of dy
with W rotated by 180 degrees in space and with input/output channels swapped inside each group,
padded by ``d*(k-1) - p`` on each side. Conv kernels are much faster than ConvTranspose kernels
on both CPU and GPU, so that form is used whenever the weight is a constant and the pads allow.

ConvTranspose: its adjoint in x is an ordinary Conv with the same weight, s, d, p and g (the
output_padding rows never reach the input).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from ._geometry import explicit_pads, transpose_padding, window_attrs
from .table import Layout, unary


def _geometry(b: GradBuilder, node: gs.Node, x: Tensor, y: Tensor, kernel: list[int]):
    in_sizes = list(b.shape(x)[2:])
    out_sizes = list(b.shape(y)[2:])
    spatial = len(in_sizes)
    strides, dilations = window_attrs(node.attrs, spatial, kernel)
    begins, ends = explicit_pads(node.attrs, in_sizes, kernel, strides, dilations)
    return in_sizes, out_sizes, strides, dilations, begins, ends


def flipped_kernel(weight: np.ndarray, groups: int) -> np.ndarray:
    """W[out, in/g, k...] -> W'[in, out/g, k...] rotated 180 degrees: the stride-1 adjoint kernel."""
    c_out, c_in_g = weight.shape[:2]
    spatial = weight.shape[2:]
    grouped = weight.reshape(groups, c_out // groups, c_in_g, *spatial)
    swapped = grouped.swapaxes(1, 2).reshape(groups * c_in_g, c_out // groups, *spatial)
    return np.ascontiguousarray(np.flip(swapped, axis=tuple(range(2, 2 + len(spatial)))))


def conv_input_grad(
    b: GradBuilder, grad: Tensor, weight: Tensor, weight_value: np.ndarray | None, groups: int,
    in_sizes: list[int], out_sizes: list[int], strides: list[int], dilations: list[int],
    begins: list[int], ends: list[int],
) -> Tensor:
    """dx for y = conv(x, W); shared with the pooling rules (a pool is a depthwise conv)."""
    kernel = list(weight_value.shape[2:]) if weight_value is not None else list(b.shape(weight)[2:])
    reach = [d * (k - 1) for k, d in zip(kernel, dilations)]
    conv_pads_begin = [r - p for r, p in zip(reach, begins)]
    conv_pads_end = [r - p for r, p in zip(reach, ends)]
    stride_one = all(s == 1 for s in strides)
    if weight_value is not None and stride_one and min(conv_pads_begin + conv_pads_end) >= 0:
        return b.op(
            "Conv",
            [grad, flipped_kernel(weight_value, groups)],
            {"pads": conv_pads_begin + conv_pads_end, "dilations": dilations, "group": groups},
        )
    geometry = [transpose_padding(i, o, k, s, d, p) for i, o, k, s, d, p in zip(in_sizes, out_sizes, kernel, strides, dilations, begins)]
    return b.op(
        "ConvTranspose",
        [grad, weight],
        {
            "strides": strides,
            "dilations": dilations,
            "group": groups,
            "pads": [g[0] for g in geometry] + [g[1] for g in geometry],
            "output_padding": [g[2] for g in geometry],
        },
    )


def conv(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x, weight = node.inputs[0], node.inputs[1]
    if b.needs_grad(weight) or (len(node.inputs) > 2 and b.needs_grad(node.inputs[2])):
        raise RuleError("Conv weights/bias on the gradient path (computed from the explained layer) are not supported")
    weight_value = b.value(weight)
    kernel = list(weight_value.shape[2:]) if weight_value is not None else list(b.shape(weight)[2:])
    in_sizes, out_sizes, strides, dilations, begins, ends = _geometry(b, node, x, node.outputs[0], kernel)
    folded = b.fold_seeds(grads[0], b.shape(node.outputs[0]), "Conv")
    dx = conv_input_grad(b, folded, weight, weight_value, int(node.attrs.get("group", 1)),
                         in_sizes, out_sizes, strides, dilations, begins, ends)
    return [b.as_grad(dx, b.shape(x))]


def conv_transpose(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x, weight = node.inputs[0], node.inputs[1]
    if b.needs_grad(weight):
        raise RuleError("ConvTranspose weights on the gradient path are not supported")
    spatial = len(b.shape(x)) - 2
    kernel = list(b.shape(weight)[2:])
    strides, dilations = window_attrs(node.attrs, spatial, kernel)
    out_sizes = list(b.shape(node.outputs[0])[2:])
    in_sizes = list(b.shape(x)[2:])
    if "output_shape" in node.attrs or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        begins, ends = _transpose_pads_from_shapes(in_sizes, out_sizes, kernel, strides, dilations, node)
    else:
        pads = list(node.attrs.get("pads", [0] * (2 * spatial)))
        begins, ends = pads[:spatial], pads[spatial:]
    folded = b.fold_seeds(grads[0], b.shape(node.outputs[0]), "ConvTranspose")
    dx = b.op(
        "Conv",
        [folded, weight],
        {"strides": strides, "dilations": dilations, "group": int(node.attrs.get("group", 1)), "pads": begins + ends},
    )
    return [b.as_grad(dx, b.shape(x))]


def _transpose_pads_from_shapes(in_sizes, out_sizes, kernel, strides, dilations, node) -> tuple[list[int], list[int]]:
    """Pads implied by output_shape/auto_pad: total = s*(in-1) + op + d*(k-1) + 1 - out."""
    output_padding = list(node.attrs.get("output_padding", [0] * len(in_sizes)))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    begins, ends = [], []
    for i, o, k, s, d, op in zip(in_sizes, out_sizes, kernel, strides, dilations, output_padding):
        total = s * (i - 1) + op + d * (k - 1) + 1 - o
        if auto_pad == "SAME_UPPER":
            begin = total // 2
        else:
            begin = total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    # A tail cropped by the end pad is dropped by Conv's floor automatically.
    return begins, [max(e, 0) for e in ends]


OPS = {"Conv": unary(conv, Layout.NCHW), "ConvTranspose": unary(conv_transpose, Layout.NCHW)}
