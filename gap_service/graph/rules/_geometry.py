"""Padding arithmetic shared by the convolution and pooling rules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def window_attrs(attrs: Mapping[str, Any], spatial: int, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    """Strides and dilations of a window op, 1 along each spatial axis unless given."""
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    return strides, dilations


def explicit_pads(
    attrs: Mapping[str, Any],
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Begin/end pads per spatial axis, resolving auto_pad the way ONNX defines it."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    spatial = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin = small if auto_pad == "SAME_UPPER" else total - small
            begins.append(begin)
            ends.append(total - begin)
        return begins, ends
    if auto_pad == "VALID":
        return [0] * spatial, [0] * spatial
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return pads[:spatial], pads[spatial:]


def transpose_padding(
    in_size: int, out_size: int, kernel: int, stride: int, dilation: int, pad_begin: int
) -> tuple[int, int, int]:
    """Pads and output_padding that make a transposed window op map ``out_size`` back to ``in_size``.

    A transposed op over ``out_size`` positions covers ``stride*(out_size-1) + dilation*(kernel-1) + 1``
    input positions starting at ``-pad_begin``; whatever lies past ``in_size`` is cropped with an end
    pad, and a shortfall (rows no window reached) is filled with output_padding (zeros).
    """
    covered = stride * (out_size - 1) + dilation * (kernel - 1) + 1 - pad_begin
    end = covered - in_size
    if end >= 0:
        return pad_begin, end, 0
    return pad_begin, 0, -end
