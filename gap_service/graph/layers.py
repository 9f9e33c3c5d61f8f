"""Which tensors of a CNN make sense as decomposition layers, and which tensor is the decision.

Decision: the classifier's logits. When the output comes out of a Softmax or a Sigmoid (a
multi-label head; possibly followed by reshapes), its input is the logits; the probabilities can
be chosen instead.

Layers: 4-D feature maps with a spatial extent, on a path to the decision. The candidates form a
chain down from any tensor: each is the last (topologically) map feeding the one above it at a
spatial resolution not used yet, i.e. a network's stage outputs. Tensors that only copy another
one (Transpose, Reshape, Identity...) or pool it are skipped. A seeded decision (a detection's
score, a region of a dense map: docs/targets.md) starts the chain at the map its seed's support
flows through (``seeded_layer``): the last map that every path from the seed's non-zero elements
down to the input passes through, all of whose channels feed them, so that a detection at one
head scale is explained by that head's branch and a class score not by its own logit map.
Channel axes come from layout propagation: Conv/Pool/BN read and write NCHW; Transposes
permute the axis; elementwise ops keep it. TensorFlow-style NHWC graphs (Transpose-wrapped
convolutions) thus get channel axis 3. Which op does what is stated once, in the op table's
layout facts (rules/table.py); the op sets below are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InvalidModelError, UnknownTensorError
from .loader import NormalizedModel
from .rules import Layout, entry, ops_with
from .support import Support, backward, channels_covered

NCHW_OPS = ops_with(Layout.NCHW)
ELEMENTWISE = ops_with(Layout.ELEMENTWISE)
# Copies and pooled maps repeat their input channel by channel: a layer below one would explain it trivially.
NOT_A_LAYER = ops_with(Layout.COPY | Layout.POOLING)
PASS_THROUGH_AFTER_SOFTMAX = ops_with(Layout.SAME_ORDER)
NORMALIZERS = ("Softmax", "Sigmoid")  # probabilities whose input is the logits explained


@dataclass(frozen=True)
class LayerInfo:
    """A candidate decomposition layer."""

    name: str
    shape: tuple[int, ...]
    channel_axis: int
    op: str  # the op that produces it
    reason: str = "chosen explicitly"  # why it is a layer (default layers: which map of the chain)

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(d for axis, d in enumerate(self.shape) if axis not in (0, self.channel_axis))


@dataclass(frozen=True)
class Decision:
    """The tensor whose entries are explained (logits), and the probabilities if any."""

    logits: str
    probabilities: str | None
    shape: tuple[int, ...]


def find_decision(graph: gs.Graph, nm: NormalizedModel, output: str | None = None, explain_probability: bool = False) -> Decision:
    tensors = graph.tensors()
    name = output or nm.outputs[0]
    if name not in tensors:
        raise UnknownTensorError(f"output tensor '{name}' is not in the model (outputs: {nm.outputs})")
    probabilities = None
    current = tensors[name]
    while current.inputs and current.inputs[0].op in PASS_THROUGH_AFTER_SOFTMAX:
        current = current.inputs[0].inputs[0]
    if current.inputs and current.inputs[0].op in NORMALIZERS:
        probabilities = current.name
        if not explain_probability:
            name = current.inputs[0].inputs[0].name
    return Decision(logits=name, probabilities=probabilities, shape=tuple(nm.shapes[name]))


def channel_axes(graph: gs.Graph, nm: NormalizedModel) -> dict[str, int]:
    """Channel axis of every 4-D tensor whose layout can be inferred."""
    axes: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in NCHW_OPS:
            for t in [node.inputs[0], node.outputs[0]]:
                if len(nm.shapes.get(t.name, ())) == 4:
                    axes[t.name] = 1
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            four_d = [t for t in [*node.inputs, *node.outputs] if t.name and len(nm.shapes.get(t.name, ())) == 4]
            if node.op == "Transpose" and len(four_d) == 2:
                perm = list(node.attrs.get("perm", [3, 2, 1, 0]))
                x, y = node.inputs[0].name, node.outputs[0].name
                if x in axes and y not in axes:
                    axes[y] = perm.index(axes[x])
                    changed = True
                elif y in axes and x not in axes:
                    axes[x] = perm[axes[y]]
                    changed = True
            elif node.op in ELEMENTWISE:
                # Broadcasting aligns axes, so all 4-D operands share one layout.
                known = {axes[t.name] for t in four_d if t.name in axes}
                if len(known) == 1:
                    axis = known.pop()
                    for t in four_d:
                        if t.name not in axes:
                            axes[t.name] = axis
                            changed = True
    return axes


def _ancestors(graph: gs.Graph, name: str) -> set[str]:
    """Tensors with a differentiable path to ``name``."""
    seen = {name}
    for node in reversed(graph.nodes):
        if not entry(node.op).carries_gradient:
            continue
        if any(t.name in seen for t in node.outputs):
            seen.update(t.name for t in node.inputs if not isinstance(t, gs.Constant) and t.name)
    return seen


def feature_maps(graph: gs.Graph, nm: NormalizedModel, axes: dict[str, int]) -> dict[str, LayerInfo]:
    """Every tensor that can be a layer, by name: float 4-D maps of batch 1 with a spatial extent,
    made by an op that is neither a copy nor a pooling. ``axes``: ``channel_axes`` of the graph."""
    inputs = set(nm.inputs)
    maps: dict[str, LayerInfo] = {}
    for node in graph.nodes:
        if node.op in NOT_A_LAYER:
            continue
        for t in node.outputs:
            shape = nm.shapes.get(t.name)
            if t.name in inputs or shape is None or len(shape) != 4 or shape[0] != 1:
                continue
            if np.dtype(nm.dtypes.get(t.name, np.float32)).kind != "f":
                continue
            info = LayerInfo(t.name, tuple(shape), axes.get(t.name, 1), node.op)
            if int(np.prod(info.spatial_shape)) > 1:
                maps[t.name] = info
    return maps


def candidate_layers(graph: gs.Graph, maps: dict[str, LayerInfo], top: str, start: LayerInfo | None = None) -> list[LayerInfo]:
    """The chain below tensor ``top``, highest first, each layer feeding the one before; empty when
    no feature map feeds it. ``start``: a first layer already chosen (``seeded_layer``), which the
    chain then continues below. ``maps``: ``feature_maps`` of the graph."""
    order = _topo_index(graph)
    layers: list[LayerInfo] = [start] if start is not None else []
    used: set[tuple[int, ...]] = {start.spatial_shape} if start is not None else set()
    current = start.name if start is not None else top
    while True:
        feeding = _ancestors(graph, current) - {current}
        options = [m for m in maps.values() if m.name in feeding and m.spatial_shape not in used]
        if not options:
            break
        chosen = max(options, key=lambda m: order[m.name])
        size = "x".join(str(d) for d in chosen.spatial_shape)
        layers.append(replace(chosen, reason=f"the last {size} map feeding '{current}'"))
        used.add(chosen.spatial_shape)
        current = chosen.name
    return layers


def seeded_layer(graph: gs.Graph, nm: NormalizedModel, maps: dict[str, LayerInfo], root: str,
                 support: Support) -> LayerInfo | None:
    """The first layer for a seed on ``root`` whose non-zero elements are ``support``: the last map
    that every path from them down to the input passes through (so the root's whole gradient
    flows through it), among the maps all of whose channels feed them (a logit map that only its
    seeded channel feeds would be a trivial decomposition). None when no map qualifies."""
    def dominates(name: str, value: Support, live: set[str]) -> bool:
        return live == {name} and _fed_by_every_channel(maps.get(name), value)

    for name, _ in backward(graph, nm.shapes, root, support, dominates):
        info = maps[name]
        return replace(info, reason=f"the last map all of the seed on '{root}' flows through "
                                    f"({'x'.join(str(d) for d in info.spatial_shape)}, every channel feeds it)")
    return None


def branch_layers(graph: gs.Graph, nm: NormalizedModel, maps: dict[str, LayerInfo], root: str,
                  support: Support) -> list[LayerInfo]:
    """The first maps reached from ``support`` on each path down (all of whose channels feed it):
    for a probe seed over every anchor of one class, the head branches a single detection's
    ``seeded_layer`` can be, which a detector's forward run taps ahead of its decoding."""
    def first(name: str, value: Support, live: set[str]) -> bool:
        return _fed_by_every_channel(maps.get(name), value)

    return [replace(maps[name], reason=f"the first map on this path from the seed on '{root}' (every channel feeds it)")
            for name, _ in backward(graph, nm.shapes, root, support, first)]


def _fed_by_every_channel(info: LayerInfo | None, support: Support) -> bool:
    if info is None or info.channels < 2:
        return False
    covered = channels_covered(support, info.channel_axis)
    return covered is None or bool(covered.all())


def require_layers(layers: list[LayerInfo], decision: Decision) -> list[LayerInfo]:
    """The default layers, or why there are none (candidates may be empty: plain VJPs work without)."""
    if not layers:
        raise InvalidModelError(
            f"no 4-D feature maps (batch 1, spatial size > 1) feed the decision tensor '{decision.logits}': "
            "this does not look like a CNN"
        )
    return layers


def _topo_index(graph: gs.Graph) -> dict[str, int]:
    return {t.name: i for i, node in enumerate(graph.nodes) for t in node.outputs}


def layer_info(graph: gs.Graph, nm: NormalizedModel, name: str, axes: dict[str, int]) -> LayerInfo:
    """Describe any tensor chosen explicitly as a layer. ``axes``: ``channel_axes`` of the graph."""
    tensors = graph.tensors()
    if name not in tensors or name not in nm.shapes:
        raise UnknownTensorError(f"layer '{name}' is not a tensor of the model")
    shape = nm.shapes[name]
    producer = tensors[name].inputs[0].op if tensors[name].inputs else "Input"
    axis = axes.get(name, 1 if len(shape) >= 2 else 0)
    return LayerInfo(name, tuple(shape), axis, producer)
