"""Resize/Upsample (nearest and linear).

Both modes are separable: along each resized axis the output is out = M x with an interpolation
matrix M[out_len, in_len] (one-hot rows for nearest, two weights for linear). The gradient
applies M^T along each axis. M is built here from ONNX's coordinate transformation and
nearest-rounding rules and checked against onnxruntime's forward in the tests.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import GradBuilder, RuleError, Tensor
from .table import unary


def _decode(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def source_coordinate(out_index: np.ndarray, scale: float, in_len: int, out_len: int, mode: str) -> np.ndarray:
    """Where output positions sample the input, per coordinate_transformation_mode."""
    x = out_index.astype(np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        center = in_len / 2
        offset = center * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise RuleError(f"Resize coordinate_transformation_mode '{mode}' is not supported")


def _round_nearest(coord: np.ndarray, nearest_mode: str) -> np.ndarray:
    if nearest_mode == "round_prefer_floor":
        return np.where(coord - np.floor(coord) == 0.5, np.floor(coord), np.round(coord))
    if nearest_mode == "round_prefer_ceil":
        return np.floor(coord + 0.5)
    if nearest_mode == "floor":
        return np.floor(coord)
    if nearest_mode == "ceil":
        return np.ceil(coord)
    raise RuleError(f"Resize nearest_mode '{nearest_mode}' is not supported")


def interpolation_matrix(
    in_len: int, out_len: int, scale: float, mode: str, coordinate_mode: str, nearest_mode: str
) -> np.ndarray:
    coord = source_coordinate(np.arange(out_len), scale, in_len, out_len, coordinate_mode)
    matrix = np.zeros([out_len, in_len], dtype=np.float64)
    rows = np.arange(out_len)
    if mode == "nearest":
        index = np.clip(_round_nearest(coord, nearest_mode), 0, in_len - 1).astype(np.int64)
        matrix[rows, index] = 1.0
        return matrix.astype(np.float32)
    if mode == "linear":
        coord = np.clip(coord, 0, in_len - 1)
        low = np.floor(coord).astype(np.int64)
        high = np.minimum(low + 1, in_len - 1)
        frac = coord - low
        np.add.at(matrix, (rows, low), 1.0 - frac)
        np.add.at(matrix, (rows, high), frac)
        return matrix.astype(np.float32)
    raise RuleError(f"Resize mode '{mode}' is not supported (nearest and linear are)")


def _scales(b: GradBuilder, node: gs.Node, in_shape, out_shape) -> list[float]:
    """Per-axis scale factors as the op used them (given scales win over out/in)."""
    rank = len(in_shape)
    scales_input = None
    if node.op == "Upsample":
        scales_input = node.inputs[1] if len(node.inputs) > 1 else None
    elif len(node.inputs) > 2 and node.inputs[2].name:
        scales_input = node.inputs[2]
    values = b.value(scales_input) if scales_input is not None else None
    if values is not None and values.size == rank:
        return [float(v) for v in values]
    if "scales" in node.attrs:
        return [float(v) for v in node.attrs["scales"]]
    return [o / i for i, o in zip(in_shape, out_shape)]


def resize(b: GradBuilder, node: gs.Node, grads: list[Tensor | None]) -> list[Tensor | None]:
    x = node.inputs[0]
    in_shape, out_shape = b.shape(x), b.shape(node.outputs[0])
    rank = len(in_shape)
    mode = _decode(node.attrs.get("mode"), "nearest")
    if node.attrs.get("axes") is not None or int(node.attrs.get("antialias", 0)):
        raise RuleError("Resize with axes or antialias is not supported")
    coordinate_mode = _decode(node.attrs.get("coordinate_transformation_mode"), "half_pixel")
    if node.op == "Upsample":
        coordinate_mode = "asymmetric"
    nearest_mode = _decode(node.attrs.get("nearest_mode"), "round_prefer_floor")
    scales = _scales(b, node, in_shape, out_shape)
    grad = grads[0]
    for axis in range(rank):
        if in_shape[axis] == out_shape[axis] and math.isclose(scales[axis], 1.0):
            continue
        matrix = interpolation_matrix(in_shape[axis], out_shape[axis], scales[axis], mode, coordinate_mode, nearest_mode)
        grad = b.along_axis(grad, matrix.T, axis + 1, rank + 1)
    return [grad]


OPS = {"Resize": unary(resize), "Upsample": unary(resize)}
