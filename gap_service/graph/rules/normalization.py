"""Normalisation layers in inference form.

BatchNormalization: y = (x - mean) / sqrt(var + eps) * scale + bias is affine per channel, so
dx = dy * scale / sqrt(var + eps), broadcast over the channel axis 1.

LRN: y_c = x_c * d_c^-beta with d_c = bias + alpha/n * sum_{j in W(c)} x_j^2 and the window
W(c) = [c - floor((n-1)/2), c + ceil((n-1)/2)]. Then
dx_j = dy_j d_j^-beta - (2 alpha beta / n) x_j sum_{c: j in W(c)} dy_c x_c d_c^(-beta-1),
where both window sums are products with a band matrix along the channel axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from .table import Layout, no_rule, unary


def batch_norm(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x, scale, _bias, _mean, var = node.inputs[:5]
    if int(node.attrs.get("training_mode", 0)):
        raise RuleError("BatchNormalization in training mode is not supported")
    if any(b.needs_grad(t) for t in node.inputs[1:]):
        raise RuleError("BatchNormalization parameters on the gradient path are not supported")
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    gain = b.constant(scale, "BatchNormalization scale") / np.sqrt(b.constant(var, "BatchNormalization var") + epsilon)
    rank = len(b.shape(x))
    gain = gain.reshape([-1] + [1] * (rank - 2)).astype(np.float32)
    return [b.mul(grads[0], gain)]


def _band(channels: int, size: int) -> np.ndarray:
    """band[c, j] = 1 where j lies in the LRN window of channel c."""
    low, high = (size - 1) // 2, size - 1 - (size - 1) // 2
    c = np.arange(channels)
    return ((c[None, :] >= c[:, None] - low) & (c[None, :] <= c[:, None] + high)).astype(np.float32)


def lrn(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    shape = b.shape(x)
    rank = len(shape)
    size = int(node.attrs["size"])
    alpha = float(node.attrs.get("alpha", 1e-4))
    beta = float(node.attrs.get("beta", 0.75))
    bias = float(node.attrs.get("bias", 1.0))
    band = _band(shape[1], size)
    window_sum = b.along_axis(b.mul(x, x), band, axis=1, rank=rank)  # forward layout
    d = b.op("Add", [b.mul(window_sum, np.float32(alpha / size)), np.float32(bias)])
    d_neg_beta = b.op("Pow", [d, np.float32(-beta)])
    direct = b.mul(grads[0], d_neg_beta)
    through = b.mul(b.mul(grads[0], x), b.op("Div", [d_neg_beta, d]))
    spread = b.along_axis(through, band.T, axis=2, rank=rank + 1)  # gradient layout
    cross = b.mul(b.mul(spread, x), np.float32(2 * alpha * beta / size))
    return [b.op("Sub", [direct, cross])]


OPS = {
    "BatchNormalization": unary(batch_norm, Layout.NCHW),
    "LRN": unary(lrn, Layout.NCHW),
    "InstanceNormalization": no_rule(Layout.NCHW),
}
