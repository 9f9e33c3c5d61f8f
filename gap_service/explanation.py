"""The result of an explanation: a tree of supporting channels, each with its evidence map."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import invalid


@dataclass
class Node:
    """One node of the decomposition tree.

    The root (level 0) is the decision: ``layer`` is the tensor its seed lies on (the logits of a
    classifier) and ``channel`` the target class (-1 for an element or a custom seed). A child at level d is channel ``channel`` of layer l_d supporting its parent;
    ``score`` is the channel's contribution sum, ``share`` its fraction of the parent's positive
    contributions, and ``map`` the positive contribution ReLU(C[k]) at layer resolution.
    """

    id: int
    parent: int | None
    level: int
    layer: str
    channel: int
    score: float
    share: float
    map: np.ndarray
    children: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "level": self.level,
            "layer": self.layer,
            "channel": self.channel,
            "score": self.score,
            "share": self.share,
            "map_shape": list(self.map.shape),
            "children": list(self.children),
        }


@dataclass(frozen=True, eq=False)
class ExplainedTarget:
    """What the root decision is: ``<seed, outputs>`` for one input (docs/targets.md)."""

    kind: str  # "class", "detection", "region", "element" or "seed"
    outputs: tuple[str, ...]  # the outputs the seed lies on (several: a detection spread over heads)
    channel: int  # the class (class and detection targets), the region's channel, else -1
    score: float  # <seed, outputs>: the root node's score
    probability: float | None = None  # a class's probability, a detection's confidence
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2: a detection's in input pixels,
    #                                                       a region's in the pixels of its map
    mask: np.ndarray | None = None  # a region's weights [H, W] on its map
    map_hw: tuple[int, int] | None = None  # a region's map size (its box and mask scale from it to the input)
    detection: int | None = None  # a detection's index among the decoded boxes, best first
    index: tuple[int, ...] | None = None  # an element target's index into its output

    def describe(self, label: str | None = None) -> str:
        """One line a reader names the decision by, e.g. "detection 0 'title' (class 1) at [x1, y1, x2, y2]"."""
        named = f" '{label}'" if label is not None else ""
        where = ", ".join(self.outputs)
        if self.kind == "class":
            return f"class {self.channel}{named}"
        if self.kind == "detection":
            box = ", ".join(f"{v:.0f}" for v in self.box or ())
            return f"detection {self.detection}{named} (class {self.channel}) at [{box}]"
        if self.kind == "region":
            extent = "a mask" if self.mask is not None and self.box is None else (
                "[" + ", ".join(f"{v:g}" for v in self.box) + "]" if self.box is not None else "the whole map")
            return f"region {extent} of channel {self.channel}{named} of '{where}'"
        if self.kind == "element":
            return f"element '{where}'{list(self.index or ())}"
        return f"a seed on '{where}'"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (a region's mask as its shape only)."""
        return {"kind": self.kind, "outputs": list(self.outputs), "channel": self.channel, "score": self.score,
                "probability": self.probability, "box": list(self.box) if self.box is not None else None,
                "mask_shape": list(self.mask.shape) if self.mask is not None else None,
                "map_hw": list(self.map_hw) if self.map_hw is not None else None, "detection": self.detection,
                "index": list(self.index) if self.index is not None else None}


@dataclass
class Explanation:
    """A gAP decomposition of one decision for one input."""

    model: str
    target: int
    label: str | None
    logit: float
    probability: float | None
    layers: list[str]
    score_mode: str
    nodes: list[Node]
    input_hw: tuple[int, int]
    picture: np.ndarray | None = None  # RGB uint8 picture of the input, when known
    cams: dict[str, np.ndarray] = field(default_factory=dict)  # "gradcam"/"layercam" at layer l_1
    root_path: tuple[int, ...] = ()  # channels from the decision to nodes[0] (a subtree of an Expand)
    engine_seconds: float = 0.0  # time spent computing it (forward and gradient runs)
    explained: ExplainedTarget | None = None  # what the decision is (a class, a detection's box, a region...)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def level(self, level: int) -> list[Node]:
        return [n for n in self.nodes if n.level == level]

    @property
    def depth(self) -> int:
        return max(n.level for n in self.nodes)

    def path(self, node_id: int) -> list[int]:
        """Channels from the decision down to this node (the decision itself excluded)."""
        channels = []
        node = self.nodes[node_id]
        while node.parent is not None:
            channels.append(node.channel)
            node = self.nodes[node.parent]
        return [*self.root_path, *channels[::-1]]

    def paths(self) -> dict[int, list[int]]:
        """Every node's path, in one pass (parents come before their children)."""
        paths: dict[int, list[int]] = {self.nodes[0].id: list(self.root_path)}
        for node in self.nodes[1:]:
            paths[node.id] = [*paths[node.parent], node.channel]
        return paths

    def node_at(self, path: Sequence[int]) -> Node:
        """The node at ``path`` (channels from nodes[0]), or an error naming the step that is not a child."""
        node = self.root
        for step, channel in enumerate(path):
            children = [self.nodes[c] for c in node.children]
            match = next((c for c in children if c.channel == channel), None)
            if match is None:
                raise invalid(f"path[{step}]", f"channel {channel} of layer '{self.layers[len(self.root_path) + step]}' is not a supporting "
                              f"channel of its parent for these options (its children are channels {[c.channel for c in children]})")
            node = match
        return node

    def subtree(self, path: Sequence[int]) -> Explanation:
        """The subtree below the node at ``path``: nodes[0] is that node, ids renumbered from 0.

        Levels and paths stay those of the full tree; the decision's CAMs stay only with the root.
        """
        top = self.node_at(path)
        order = [top]
        for current in order:
            order.extend(self.nodes[c] for c in current.children)
        order.sort(key=lambda n: n.id)
        ids = {n.id: index for index, n in enumerate(order)}
        nodes = [replace(n, id=ids[n.id], parent=ids.get(n.parent) if n is not top else None,
                         children=[ids[c] for c in n.children]) for n in order]
        return replace(self, nodes=nodes, root_path=(*self.root_path, *path), cams=self.cams if not path else {})

    def upsampled(self, node_id: int) -> np.ndarray:
        """The node's map stretched to the input resolution (bilinear), for display."""
        return upsample(self.nodes[node_id].map, self.input_hw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "label": self.label,
            "logit": self.logit,
            "probability": self.probability,
            "layers": list(self.layers),
            "score": self.score_mode,
            "input_hw": list(self.input_hw),
            "explained": self.explained.to_dict() if self.explained is not None else None,
            "nodes": [n.to_dict() for n in self.nodes],
        }


def upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map (align_corners=False), in numpy."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        values = values.reshape(values.shape[-2:]) if values.size == int(np.prod(values.shape[-2:])) else values.reshape(1, -1)
    out_h, out_w = size

    def weights(in_len: int, out_len: int) -> np.ndarray:
        coord = np.clip((np.arange(out_len) + 0.5) * in_len / out_len - 0.5, 0, in_len - 1)
        low = np.floor(coord).astype(int)
        high = np.minimum(low + 1, in_len - 1)
        matrix = np.zeros((out_len, in_len), dtype=np.float32)
        np.add.at(matrix, (np.arange(out_len), low), 1 - (coord - low))
        np.add.at(matrix, (np.arange(out_len), high), coord - low)
        return matrix

    return weights(values.shape[0], out_h) @ values @ weights(values.shape[1], out_w).T
