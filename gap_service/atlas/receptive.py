"""Receptive fields from the graph: which input pixels a unit of a feature map can see.

Along one spatial axis every tensor on an analysable path maps unit ``u`` to the input window
``[start + u*jump, start + u*jump + size)`` (an :class:`AxisField`). The image input has
``(size, jump, start) = (1, 1, 0)``; each op composes it:

    window op (Conv, MaxPool, AveragePool, LpPool) with kernel k, stride s, dilation d, begin pad p:
        output unit o reads inputs [o*s - p, o*s - p + d*(k-1)]
        -> size += d*(k-1)*jump, start -= p*jump, jump *= s
    ConvTranspose (stride s, jump divisible by s): output o gets inputs i with i*s - p + t*d = o,
        i in [(o + p - d*(k-1))/s, (o + p)/s]
        -> jump /= s, start += (p - d*(k-1))*jump/s, size += d*(k-1)*jump/s
        exact for s = 1; for s > 1 a superset by less than ``jump`` pixels per side (rounding of i).
    Pad (constant mode) with begin pad p: output u is input u - p -> start -= p*jump
    elementwise, BatchNormalization, activations, channel-axis Concat/Slice/Split: the union of
        the operands' windows (one jump required); Transpose permutes the axes.

Inputs broadcast over every spatial axis (a squeeze-excitation gate made by a global pool) carry
global context, not local evidence: they do not widen the window, and the field records
``global_context``. Anything else (Resize, Reshape, reflect padding, spatial Concat...) makes
the path not analysable, and the result says which node and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from ..graph.layers import ELEMENTWISE, channel_axes
from ..graph.loader import NormalizedModel
from ..graph.rules._geometry import explicit_pads, window_attrs

WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
GLOBAL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
KEEP_OPS = ELEMENTWISE | {"BatchNormalization", "LRN"}
CHANNEL_WISE_OPS = frozenset({"Concat", "Slice", "Split"})  # fine unless they cut a spatial axis
NO_PIXELS = frozenset({"Shape", "Size"})  # their outputs describe a tensor, not its content

Box = tuple[int, int, int, int]  # top, left, bottom, right (bottom/right exclusive), in input pixels


@dataclass(frozen=True)
class AxisField:
    """Unit u along one axis sees input pixels [start + u*jump, start + u*jump + size)."""

    size: int
    jump: int
    start: int

    def window(self, unit: int) -> tuple[int, int]:
        low = self.start + unit * self.jump
        return low, low + self.size

    def union(self, other: AxisField) -> AxisField:
        start = min(self.start, other.start)
        return AxisField(max(self.start + self.size, other.start + other.size) - start, self.jump, start)


@dataclass(frozen=True)
class ReceptiveField:
    """A layer's field: ``rows``/``cols`` along the image's height and width."""

    rows: AxisField
    cols: AxisField
    global_context: bool = False
    transposed: bool = False  # the layer's first spatial axis runs along the image's width

    def box(self, unit: Sequence[int], height: int, width: int) -> Box:
        """The window of the unit at spatial index ``unit`` (layer axis order), clipped to the image."""
        first, second = unit
        row, col = (second, first) if self.transposed else (first, second)
        top, bottom = self.rows.window(row)
        left, right = self.cols.window(col)
        return max(top, 0), max(left, 0), min(bottom, height), min(right, width)

    def to_dict(self) -> dict:
        return {"rows": vars(self.rows), "cols": vars(self.cols), "global_context": self.global_context,
                "transposed": self.transposed}

    @classmethod
    def from_dict(cls, data: Mapping) -> ReceptiveField:
        return cls(AxisField(**data["rows"]), AxisField(**data["cols"]), bool(data["global_context"]),
                   bool(data["transposed"]))


@dataclass(frozen=True)
class NotAnalysable:
    """Why no receptive field could be followed to this tensor."""

    reason: str


@dataclass(frozen=True)
class _TensorField:
    """Tensor axis -> (image axis 0 = rows / 1 = cols, its field); no axes: global (pooled) data."""

    axes: Mapping[int, tuple[int, AxisField]]
    global_context: bool = False


_IDENTITY = AxisField(1, 1, 0)
_Field = _TensorField | NotAnalysable


def receptive_fields(nm: NormalizedModel, names: Sequence[str],
                     image_input: str | None = None) -> dict[str, ReceptiveField | NotAnalysable]:
    """The receptive field of every tensor in ``names`` on the image input (default: the first input)."""
    graph = nm.graph()
    image = image_input or next(iter(nm.inputs))
    spatial = image_axes(nm, image, graph)
    if spatial is None:
        return {name: NotAnalysable(f"input '{image}' of shape {list(nm.inputs[image])} is not an image") for name in names}
    fields: dict[str, _Field] = {image: _TensorField({spatial[0]: (0, _IDENTITY), spatial[1]: (1, _IDENTITY)})}
    for node in graph.nodes:
        data = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name in fields]
        if not data or node.op in NO_PIXELS:
            continue  # no pixels flow through it (weights, shapes, other inputs)
        result = _propagate(node, data, fields, nm)
        for out in node.outputs:
            if out.name:
                fields[out.name] = result
    return {name: _layer_field(name, fields.get(name), nm) for name in names}


def image_axes(nm: NormalizedModel, image: str, graph: gs.Graph | None = None) -> tuple[int, int] | None:
    """The (rows, cols) axes of an image input: the two that are neither batch nor channels."""
    channel = channel_axes(graph or nm.graph(), nm).get(image, 1)
    spatial = [a for a in range(len(nm.inputs[image])) if a not in (0, channel)]
    return (spatial[0], spatial[1]) if len(spatial) == 2 else None


def _layer_field(name: str, field: _Field | None, nm: NormalizedModel) -> ReceptiveField | NotAnalysable:
    if field is None:
        return NotAnalysable(f"tensor '{name}' does not depend on the image input")
    if isinstance(field, NotAnalysable):
        return field
    if len(field.axes) != 2:
        return NotAnalysable(f"tensor '{name}' of shape {list(nm.shapes[name])} is pooled over the image")
    (image_a, first), (_, second) = (field.axes[a] for a in sorted(field.axes))
    rows, cols = (first, second) if image_a == 0 else (second, first)
    return ReceptiveField(rows, cols, field.global_context, transposed=image_a == 1)


def _where(node: gs.Node) -> str:
    return f"{node.op} node '{node.name}'"


def _propagate(node: gs.Node, data: list[gs.Tensor], fields: Mapping[str, _Field], nm: NormalizedModel) -> _Field:
    operands = [fields[t.name] for t in data]
    failed = next((f for f in operands if isinstance(f, NotAnalysable)), None)
    if failed is not None:
        return failed
    inputs: list[_TensorField] = operands  # type: ignore[assignment]
    if node.op in GLOBAL_OPS:
        return _TensorField({}, True)
    if node.op in WINDOW_OPS or node.op == "ConvTranspose":
        return _window(node, inputs[0], nm)
    if node.op == "Pad":
        return _pad(node, inputs[0], len(nm.shapes[data[0].name]))
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm", reversed(range(len(nm.shapes[data[0].name])))))
        return replace(inputs[0], axes={out: inputs[0].axes[a] for out, a in enumerate(perm) if a in inputs[0].axes})
    if node.op in CHANNEL_WISE_OPS:
        cut = _cut_axes(node, nm)
        if any(axis in f.axes for f in inputs for axis in cut):
            return NotAnalysable(f"{_where(node)} cuts or joins a spatial axis")
    elif node.op not in KEEP_OPS:
        return NotAnalysable(f"{_where(node)}: no receptive-field rule for {node.op}")
    return _union(node, data, inputs, nm)


def _union(node: gs.Node, data: list[gs.Tensor], inputs: list[_TensorField], nm: NormalizedModel) -> _Field:
    """Operands keeping the spatial layout: windows unite; fully broadcast ones add global context."""
    out_shape = nm.shapes[node.outputs[0].name]
    local = [f for t, f in zip(data, inputs) if _extent(nm.shapes[t.name]) > 1 or _extent(out_shape) == 1]
    context = any(f.global_context for f in inputs) or len(local) < len(inputs)
    if not local:
        return _TensorField({}, context)
    axes = dict(local[0].axes)
    for other in local[1:]:
        if set(other.axes) != set(axes):
            return NotAnalysable(f"{_where(node)} combines operands whose spatial axes differ")
        for axis, (image_axis, field) in other.axes.items():
            mine_axis, mine = axes[axis]
            if image_axis != mine_axis or field.jump != mine.jump:
                return NotAnalysable(f"{_where(node)} combines operands of different resolutions")
            axes[axis] = (image_axis, mine.union(field))
    return _TensorField(axes, context)


def _extent(shape: Sequence[int]) -> int:
    """Elements per batch and channel: 1 for a globally pooled map."""
    return math.prod(shape[2:])


def _cut_axes(node: gs.Node, nm: NormalizedModel) -> set[int]:
    rank = len(nm.shapes[node.inputs[0].name])
    if node.op == "Slice":
        given = len(node.inputs) > 3 and isinstance(node.inputs[3], gs.Constant)
        return {int(a) % rank for a in (node.inputs[3].values.tolist() if given else range(rank))}
    return {int(node.attrs.get("axis", 0)) % rank}


def _window(node: gs.Node, field: _TensorField, nm: NormalizedModel) -> _Field:
    """Conv/pool windows along axes 2, 3 of their NCHW input (formulas in the module docstring)."""
    if not field.axes:
        return field  # a 1x1 map of pooled context stays global
    in_shape = nm.shapes[node.inputs[0].name]
    if set(field.axes) != set(range(2, len(in_shape))):
        return NotAnalysable(f"{_where(node)} reads the image's spatial axes as channels")
    weight = node.inputs[1] if node.op in ("Conv", "ConvTranspose") else None
    kernel = list(node.attrs.get("kernel_shape") or (nm.shapes[weight.name][2:] if weight is not None else []))
    in_sizes = list(in_shape[2:])
    strides, dilations = window_attrs(node.attrs, len(in_sizes), kernel)
    if node.op == "ConvTranspose":
        if node.attrs.get("output_shape") or _text(node.attrs.get("auto_pad", "NOTSET")) != "NOTSET":
            return NotAnalysable(f"{_where(node)}: only explicit pads are supported for ConvTranspose")
        begins = list(node.attrs.get("pads", [0] * 2 * len(in_sizes)))[: len(in_sizes)]
    else:
        begins, _ = explicit_pads(node.attrs, in_sizes, kernel, strides, dilations)
    axes = {}
    for i, (k, s, d, p) in enumerate(zip(kernel, strides, dilations, begins)):
        image_axis, f = field.axes[2 + i]
        reach = d * (k - 1)
        if node.op != "ConvTranspose":
            axes[2 + i] = (image_axis, AxisField(f.size + reach * f.jump, f.jump * s, f.start - p * f.jump))
        elif f.jump % s:
            return NotAnalysable(f"{_where(node)} upsamples by {s} below the input resolution (jump {f.jump})")
        else:
            jump = f.jump // s
            axes[2 + i] = (image_axis, AxisField(f.size + reach * jump, jump, f.start + (p - reach) * jump))
    return _TensorField(axes, field.global_context)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pad(node: gs.Node, field: _TensorField, rank: int) -> _Field:
    mode = _text(node.attrs.get("mode", "constant"))
    if mode != "constant":
        return NotAnalysable(f"{_where(node)}: {mode} padding repeats pixels from elsewhere in the map")
    if not isinstance(node.inputs[1], gs.Constant):
        return NotAnalysable(f"{_where(node)}: the pads are not constant")
    pads = [int(p) for p in node.inputs[1].values.tolist()]
    axes_input = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if axes_input is not None and not isinstance(axes_input, gs.Constant):
        return NotAnalysable(f"{_where(node)}: the padded axes are not constant")
    axes = [int(a) % rank for a in axes_input.values.tolist()] if axes_input is not None else list(range(rank))
    shifted = dict(field.axes)
    for i, axis in enumerate(axes):
        if axis in shifted:
            image_axis, f = shifted[axis]
            shifted[axis] = (image_axis, replace(f, start=f.start - pads[i] * f.jump))
    return _TensorField(shifted, field.global_context)
