"""Which elements of each tensor feed a seed's non-zero elements: the seed's support, propagated
backwards through the graph, for layer discovery by target (layers.py).

A support is None (nothing of the tensor feeds the seed), ``ALL``, or a boolean array of the
tensor's shape. Ops that only move elements (reshapes, transposes, Concat, Split, Slice, Pad,
Gather with constant indices, Expand, Tile) and elementwise ops map it exactly, with numpy index
arithmetic; any other op (convolutions, matrix products, reductions, resizes) spreads a non-empty
support to the whole of each input it differentiates, which can only make a map look more
relevant than it is, never less. Only the model's structure is read: no session, no values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from .rules import Layout, entry

ALL = "all"  # the support that covers every element
Support = np.ndarray | str | None
Shapes = Mapping[str, tuple[int, ...]]
SAME_ORDER = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast"}


def as_mask(support: Support, shape: tuple[int, ...]) -> np.ndarray:
    """The support as a boolean array of ``shape``."""
    if isinstance(support, str):
        return np.ones(shape, bool)
    return np.zeros(shape, bool) if support is None else support


def union(a: Support, b: Support, shape: tuple[int, ...]) -> Support:
    if a is None or isinstance(b, str):
        return b
    if b is None or isinstance(a, str):
        return a
    merged = a | b
    return ALL if merged.all() else merged


def channels_covered(support: Support, channel_axis: int) -> np.ndarray | None:
    """Per channel of a 4-D tensor, whether any of its elements feeds the seed (None: all of them)."""
    if isinstance(support, str):
        return None
    if support is None:
        return np.zeros(0, bool)
    other = tuple(axis for axis in range(support.ndim) if axis != channel_axis)
    return support.any(axis=other)


def backward(graph: gs.Graph, shapes: Shapes, root: str, seed_support: Support,
             stop: Callable[[str, Support, set[str]], bool]) -> Iterator[tuple[str, Support]]:
    """Propagate the root's support down the graph in reverse topological order.

    Before a node is expanded, ``stop(name, support, live)`` is asked for each of its outputs that
    has support, with ``live`` the supported tensors not expanded yet (graph inputs and constants
    excluded): a tensor for which it answers True is yielded with its support and not propagated
    further. ``live == {name}`` means every path from the seed down passes through ``name``.
    """
    supports: dict[str, Support] = {root: seed_support}
    live = {root}
    for node in reversed(graph.nodes):
        outputs = [t.name for t in node.outputs if supports.get(t.name) is not None]
        if not outputs:
            continue
        kept = []
        for name in outputs:
            if name != root and stop(name, supports[name], live):
                live.discard(name)
                yield name, supports[name]
            else:
                kept.append(name)
        if not kept:
            continue
        live.difference_update(kept)
        out = {name: supports[name] for name in kept}
        for tensor, support in zip(node.inputs, input_supports(node, out, shapes)):
            if support is None or isinstance(tensor, gs.Constant) or not tensor.name:
                continue
            supports[tensor.name] = union(supports.get(tensor.name), support, shapes[tensor.name])
            if tensor.inputs:  # produced by a node: graph inputs are never layers
                live.add(tensor.name)


def input_supports(node: gs.Node, out: Mapping[str, Support], shapes: Shapes) -> list[Support]:
    """The support of each input of ``node`` given those of its outputs (absent outputs: none)."""
    op = entry(node.op)
    if not op.carries_gradient:
        return [None] * len(node.inputs)
    first = out.get(node.outputs[0].name)
    in_shapes = [shapes.get(t.name) for t in node.inputs]
    exact = _exact(node, first, out, in_shapes, shapes)
    if exact is not None:
        return exact
    differentiable = range(len(node.inputs)) if op.differentiable is None else op.differentiable
    return [ALL if i in differentiable else None for i in range(len(node.inputs))]


def _exact(node: gs.Node, first: Support, out: Mapping[str, Support], in_shapes: list, shapes: Shapes) -> list[Support] | None:
    """Index maps of the element-moving and elementwise ops; None where the op has none (or its
    parameters are not constants), so that the caller spreads the support."""
    op = node.op
    out_shape = shapes.get(node.outputs[0].name)
    if out_shape is None or any(s is None for s in in_shapes[:1]):
        return None
    if entry(op).layout & Layout.ELEMENTWISE or op == "Expand":
        count = len(node.inputs) if op != "Expand" else 1
        return [_unbroadcast(first, out_shape, in_shapes[i]) if i < count else None for i in range(len(node.inputs))]
    if isinstance(first, str) and op in SAME_ORDER | {"Transpose", "Concat", "Pad", "Tile"}:
        return [ALL] + [None] * (len(node.inputs) - 1) if op != "Concat" else [ALL] * len(node.inputs)
    if op in SAME_ORDER:
        return [None if first is None else first.reshape(in_shapes[0])] + [None] * (len(node.inputs) - 1)
    if op == "Transpose":
        perm = list(node.attrs.get("perm", list(reversed(range(len(in_shapes[0]))))))
        return [None if first is None else first.transpose(np.argsort(perm))]
    if op == "Concat":
        axis = int(node.attrs["axis"]) % len(out_shape)
        bounds = np.cumsum([0, *(s[axis] for s in in_shapes)])
        mask = as_mask(first, out_shape)
        return [_trim(np.take(mask, range(lo, hi), axis=axis)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if op == "Split":
        axis = int(node.attrs.get("axis", 0)) % len(in_shapes[0])
        parts = [as_mask(out.get(t.name), shapes[t.name]) for t in node.outputs]
        return [_trim(np.concatenate(parts, axis=axis))] + [None] * (len(node.inputs) - 1)
    values = [t.values if isinstance(t, gs.Constant) else None for t in node.inputs]
    if op == "Slice" and all(v is not None for v in values[1:]):
        return [_slice_back(as_mask(first, out_shape), in_shapes[0], values)] + [None] * (len(node.inputs) - 1)
    if op == "Gather" and values[1] is not None:
        return [_gather_back(as_mask(first, out_shape), in_shapes[0], values[1], int(node.attrs.get("axis", 0))), None]
    if op == "Pad" and node.attrs.get("mode", "constant") == "constant" and values[1] is not None and len(node.inputs) < 4:
        return [_pad_back(first, in_shapes[0], np.asarray(values[1]).reshape(-1))] + [None] * (len(node.inputs) - 1)
    if op == "Resize" and len(in_shapes[0]) == len(out_shape):  # axes it does not resize map one to one
        kept = tuple(axis for axis, (a, b) in enumerate(zip(in_shapes[0], out_shape)) if a == b)
        return [_keep_axes(first, in_shapes[0], kept)] + [None] * (len(node.inputs) - 1)
    if _per_channel(node, in_shapes[0], out_shape):  # pooling, depthwise convolution: NCHW, channel by channel
        return [_keep_axes(first, in_shapes[0], (0, 1))] + [None] * (len(node.inputs) - 1)
    if op == "Tile" and values[1] is not None:
        repeats = [int(r) for r in np.asarray(values[1]).reshape(-1)]
        grouped = first.reshape([v for r, s in zip(repeats, in_shapes[0]) for v in (r, s)])
        return [_trim(grouped.any(axis=tuple(range(0, 2 * len(repeats), 2)))), None]
    return None


def _per_channel(node: gs.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Output channel k reads input channel k only (and batch n batch n)."""
    if len(in_shape) != 4 or len(out_shape) != 4 or in_shape[:2] != out_shape[:2]:
        return False
    if entry(node.op).layout & Layout.POOLING:
        return True
    return node.op == "Conv" and int(node.attrs.get("group", 1)) == in_shape[1] > 1


def _keep_axes(support: Support, in_shape: tuple[int, ...], kept: tuple[int, ...]) -> Support:
    """The support mapped one to one along ``kept`` axes and spread along the others."""
    if support is None or isinstance(support, str):
        return support
    spread = tuple(axis for axis in range(len(in_shape)) if axis not in kept)
    folded = support.any(axis=spread, keepdims=True) if spread else support
    return _trim(np.broadcast_to(folded, in_shape).copy())


def _trim(mask: np.ndarray) -> Support:
    """None for an empty mask, ALL for a full one."""
    if not mask.any():
        return None
    return ALL if mask.all() else mask


def _unbroadcast(support: Support, out_shape: tuple[int, ...], in_shape: tuple[int, ...] | None) -> Support:
    """An elementwise input's support: the output's, folded over the axes it was broadcast along."""
    if support is None or in_shape is None or isinstance(support, str):
        return support
    lead = len(out_shape) - len(in_shape)
    folded = support.any(axis=tuple(range(lead))) if lead else support
    axes = tuple(axis for axis, size in enumerate(in_shape) if size == 1 and folded.shape[axis] != 1)
    return _trim(folded.any(axis=axes, keepdims=True) if axes else folded)


def _slice_back(mask: np.ndarray, in_shape: tuple[int, ...], values: list) -> Support:
    starts, ends = (np.asarray(v).reshape(-1) for v in values[1:3])
    axes = np.asarray(values[3]).reshape(-1) if len(values) > 3 else np.arange(len(starts))
    steps = np.asarray(values[4]).reshape(-1) if len(values) > 4 else np.ones(len(starts), np.int64)
    index = [slice(None)] * len(in_shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = in_shape[int(axis)]
        index[int(axis) % len(in_shape)] = slice(*(int(np.clip(v, -size - 1, size)) for v in (start, end)), int(step))
    back = np.zeros(in_shape, bool)
    view = back[tuple(index)]
    if view.shape != mask.shape:  # a slice numpy reads differently from onnxruntime: stay safe
        return ALL
    back[tuple(index)] = mask
    return _trim(back)


def _gather_back(mask: np.ndarray, in_shape: tuple[int, ...], indices: np.ndarray, axis: int) -> Support:
    axis %= len(in_shape)
    flat = np.asarray(indices).reshape(-1).astype(np.int64) % in_shape[axis]
    rows = mask.reshape(*in_shape[:axis], flat.size, *in_shape[axis + 1:])
    back = np.zeros(in_shape, bool)
    for position, source in enumerate(flat):
        np.logical_or(np.take(back, source, axis=axis), np.take(rows, position, axis=axis),
                      out=back[(slice(None),) * axis + (source,)])
    return _trim(back)


def _pad_back(support: Support, in_shape: tuple[int, ...], pads: np.ndarray) -> Support:
    rank = len(in_shape)
    if isinstance(support, str) or support is None:
        return support
    if (pads < 0).any() or len(pads) != 2 * rank:
        return ALL
    return _trim(support[tuple(slice(int(b), int(b) + size) for b, size in zip(pads[:rank], in_shape))])
