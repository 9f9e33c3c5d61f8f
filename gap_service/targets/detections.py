"""Detections decoded from a detector's raw outputs, and the seeds that explain one of them.

A detector's ONNX graph usually ends before non-maximum suppression: it outputs one score per
(anchor, class) and one box per anchor. ``decode`` turns those tensors into boxes after class-wise
NMS, and every ``Detection`` remembers where its score lives in the raw outputs (output name and
flat element index), so that ``detection_seed`` can write the decision as a seed on the output,
``<seed, output>``, like the one-hot seed of a classifier's logit.

Layouts (``DetectionLayout.layout``):

- ``yolov5``: one output ``[1, N, 5 + C]``: cx, cy, w, h, objectness, C class scores; the
  confidence is objectness * class score.
- ``yolov8``: one output ``[1, 4 + C, N]``: cx, cy, w, h, C class scores (YOLOv8/v11, no
  objectness).
- ``boxes_scores``: one or more heads, each a score output ``[1, N_i, C]`` and a box output
  ``[1, N_i, 4]`` (``xyxy`` or ``cxcywh``, optionally normalised to [0, 1]) or ``[1, N_i, 4 (R + 1)]``
  (``ltrb_dfl``: the left, top, right, bottom distances from the anchor point as distributions over
  R + 1 bins in stride units, as PP-PicoDet and GFL heads output them). SSD and RetinaNet have one
  head, multi-scale heads several; anchors are numbered head after head.

Scores may be probabilities (``score_activation="none"``) or logits turned into probabilities by
a ``sigmoid`` or a ``softmax`` over the classes; thresholds and NMS always see probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..errors import InvalidModelError, invalid

LayoutName = Literal["yolov5", "yolov8", "boxes_scores"]
BoxFormat = Literal["xyxy", "cxcywh", "ltrb_dfl"]
ScoreActivation = Literal["none", "sigmoid", "softmax"]
Shapes = Mapping[str, Sequence[int]]

# The strides of the usual YOLO pyramids (P3-P5, and P3-P6 for the "6" models), for detect_layout.
YOLO_STRIDES = ((8, 16, 32), (8, 16, 32, 64))


@dataclass(frozen=True)
class Head:
    """One (scores, boxes) output pair of a ``boxes_scores`` layout."""

    scores: str
    boxes: str
    stride: int | None = None  # ltrb_dfl only: the spacing of the anchor points, in input pixels


@dataclass(frozen=True)
class DetectionLayout:
    """Which outputs hold a detector's boxes and scores, and how to read them (see the module doc)."""

    layout: LayoutName
    output: str | None = None  # yolov5 / yolov8: the one output
    heads: tuple[Head, ...] = ()  # boxes_scores
    box_format: BoxFormat = "cxcywh"
    score_activation: ScoreActivation = "none"
    normalized: bool = False  # boxes in [0, 1] of the input width and height
    background: int | None = None  # a class that is never a detection (an SSD softmax's class 0)

    def __post_init__(self) -> None:
        _one_of("task.layout", self.layout, LayoutName)
        _one_of("task.box_format", self.box_format, BoxFormat)
        _one_of("task.score_activation", self.score_activation, ScoreActivation)
        if self.layout == "boxes_scores":
            if not self.heads or self.output is not None:
                raise invalid("task.heads", "layout boxes_scores needs heads [{scores, boxes}, ...] and no output")
            if self.box_format == "ltrb_dfl" and not all(isinstance(h.stride, int) and h.stride > 0 for h in self.heads):
                raise invalid("task.heads", "box_format ltrb_dfl needs a positive integer stride on every head")
        else:
            if self.output is None or self.heads:
                raise invalid("task.output", f"layout {self.layout} needs one output and no heads")
            if self.box_format != "cxcywh" or self.score_activation == "softmax":
                raise invalid("task.box_format", f"layout {self.layout} has cxcywh boxes and per-class (not softmax) scores")
            if self.normalized or self.background is not None:
                raise invalid("task.background", f"layout {self.layout} has boxes in input pixels and no background class")

    @classmethod
    def from_config(cls, task: Mapping[str, Any]) -> DetectionLayout:
        """The layout of a model config's ``task`` object: ``{"kind": "detection", "layout": ..., ...}``."""
        if task.get("kind") != "detection":
            raise invalid("task.kind", f"'{task.get('kind')}' is not 'detection'")
        known = {"kind", "layout", "output", "heads", "box_format", "score_activation", "normalized", "background"}
        if unknown := set(task) - known:
            raise invalid("task", f"unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        heads = []
        for index, head in enumerate(task.get("heads") or ()):
            if not isinstance(head, Mapping) or set(head) - {"scores", "boxes", "stride"} or not {"scores", "boxes"} <= set(head):
                raise invalid(f"task.heads[{index}]", "must be {\"scores\": NAME, \"boxes\": NAME} with an optional stride")
            heads.append(Head(str(head["scores"]), str(head["boxes"]), head.get("stride")))
        default_format = "xyxy" if task.get("layout") == "boxes_scores" else "cxcywh"
        return cls(
            layout=task.get("layout"),  # type: ignore[arg-type]  # checked in __post_init__
            output=task.get("output"),
            heads=tuple(heads),
            box_format=task.get("box_format", default_format),
            score_activation=task.get("score_activation", "none"),
            normalized=bool(task.get("normalized", False)),
            background=task.get("background"),
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        """Every output the layout reads: the one output, or each head's scores then boxes."""
        if self.output is not None:
            return (self.output,)
        return tuple(name for head in self.heads for name in (head.scores, head.boxes))


@dataclass(frozen=True)
class ScoreRef:
    """One anchor's score for the detection's class, as entries of the raw output tensors."""

    anchor: int  # over all heads, numbered in output order
    entries: tuple[tuple[str, int], ...]  # (output name, flat element index): class score, then objectness (yolov5)
    iou: float = 1.0  # with the kept box


@dataclass(frozen=True)
class Detection:
    """A box kept by NMS, with everything a gradient seed needs."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in input pixels
    label: int
    score: float  # the confidence as a probability (objectness * class for yolov5)
    kept: ScoreRef
    merged: tuple[ScoreRef, ...] = ()  # same-class anchors this box suppressed, in NMS (score) order

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs that hold the entries of this detection (several on multi-scale heads)."""
        names = (name for ref in (self.kept, *self.merged) for name, _ in ref.entries)
        return tuple(dict.fromkeys(names))


def decode(outputs: Mapping[str, np.ndarray], layout: DetectionLayout, score_threshold: float = 0.25,
           iou_threshold: float = 0.45, max_detections: int = 100, *,
           input_hw: tuple[int, int] | None = None) -> list[Detection]:
    """Boxes after class-wise NMS, best score first.

    Every (anchor, class) whose probability exceeds ``score_threshold`` is a candidate (an anchor
    may yield boxes of several classes); candidates with a non-finite box are dropped. ``input_hw``
    (the model input's height and width) is needed for normalised boxes and ``ltrb_dfl`` anchor points.
    """
    if not 0 <= score_threshold < 1:
        raise invalid("score_threshold", f"{score_threshold} is not in [0, 1)")
    if not 0 <= iou_threshold <= 1:
        raise invalid("iou_threshold", f"{iou_threshold} is not in [0, 1]")
    if max_detections < 1:
        raise invalid("max_detections", f"{max_detections} must be at least 1")
    missing = [name for name in layout.output_names if name not in outputs]
    if missing:
        raise InvalidModelError(f"the detection layout reads outputs {missing} that the model did not return "
                                f"(it returned {sorted(outputs)})")
    shapes = {name: tuple(outputs[name].shape) for name in layout.output_names}
    _check_shapes(layout, shapes)
    boxes, scores = _anchor_boxes_and_scores(outputs, layout, input_hw)
    candidate = (scores > score_threshold) & np.isfinite(boxes).all(axis=1, keepdims=True)
    anchors, labels = np.nonzero(candidate)
    values = scores[anchors, labels]

    detections = []
    for kept, suppressed, ious in nms(boxes[anchors], values, labels, iou_threshold)[:max_detections]:
        label = int(labels[kept])
        refs = [ScoreRef(int(anchors[i]), score_entries(layout, shapes, int(anchors[i]), label), float(overlap))
                for i, overlap in zip([kept, *suppressed], [1.0, *ious])]
        box = tuple(float(v) for v in boxes[anchors[kept]])
        detections.append(Detection(box, label, float(values[kept]), refs[0], tuple(refs[1:])))  # type: ignore[arg-type]
    return detections


def score_entries(layout: DetectionLayout, output_shapes: Shapes, anchor: int, label: int) -> tuple[tuple[str, int], ...]:
    """Where (anchor, label)'s score lives: (output, flat index) of the class score, then of the
    objectness for yolov5."""
    _check_shapes(layout, output_shapes)
    classes = num_classes(layout, output_shapes)
    if not 0 <= label < classes:
        raise invalid("class", f"{label} is out of range: the detector has {classes} classes")
    if layout.output is not None:
        _, first, second = output_shapes[layout.output]
        anchors = second if layout.layout == "yolov8" else first
        if not 0 <= anchor < anchors:
            raise invalid("anchor", f"{anchor} is out of range: output '{layout.output}' has {anchors} anchors")
        if layout.layout == "yolov8":  # [1, 4 + C, N]
            return ((layout.output, (4 + label) * anchors + anchor),)
        return ((layout.output, anchor * second + 5 + label), (layout.output, anchor * second + 4))  # [1, N, 5 + C]
    local = anchor
    for head in layout.heads:
        _, count, _ = output_shapes[head.scores]
        if 0 <= local < count:
            return ((head.scores, local * classes + label),)
        local -= count
    raise invalid("anchor", f"{anchor} is out of range: the heads have {anchor - local} anchors")


def class_support(layout: DetectionLayout, output_shapes: Shapes, label: int) -> dict[str, np.ndarray]:
    """Where class ``label``'s score lives at every anchor, as a boolean mask per output holding
    it: what layer discovery probes a detector's head branches with (the class score, plus the
    objectness for yolov5, as in ``score_entries``)."""
    _check_shapes(layout, output_shapes)
    masks = {name: np.zeros(tuple(output_shapes[name]), bool)
             for name in ((layout.output,) if layout.output is not None else tuple(h.scores for h in layout.heads))}
    for name, mask in masks.items():
        if layout.layout == "yolov8":
            mask[0, 4 + label] = True
        elif layout.layout == "yolov5":
            mask[0, :, [4, 5 + label]] = True
        else:
            mask[0, :, label] = True
    return masks


def num_classes(layout: DetectionLayout, output_shapes: Shapes) -> int:
    """C, the number of classes the layout's outputs score."""
    if layout.layout == "yolov8":
        return int(output_shapes[layout.output][1]) - 4  # type: ignore[index]
    if layout.layout == "yolov5":
        return int(output_shapes[layout.output][2]) - 5  # type: ignore[index]
    return int(output_shapes[layout.heads[0].scores][2])


def detection_seed(detection: Detection, output_shapes: Shapes, spread: bool = False) -> dict[str, np.ndarray]:
    """The seed, one array shaped like each output that holds the detection's entries.

    ``<seed, outputs>`` is the kept anchor's class score (plus its objectness for yolov5), each
    entry with weight 1. With ``spread`` every anchor NMS merged into the box adds its entries
    weighted by its IoU with the kept box (docs/targets.md: the linear analogue of pytorch-grad-cam's
    FasterRCNNBoxScoreTarget).
    """
    seeds: dict[str, np.ndarray] = {}
    for ref in (detection.kept, *detection.merged) if spread else (detection.kept,):
        for name, flat in ref.entries:
            if name not in output_shapes:
                raise invalid("output", f"unknown output '{name}'; the shapes given are for {sorted(output_shapes)}")
            seed = seeds.setdefault(name, np.zeros(tuple(output_shapes[name]), np.float32))
            if not 0 <= flat < seed.size:
                raise invalid("detection", f"entry {flat} is outside output '{name}' of shape {list(seed.shape)}")
            seed.flat[flat] += ref.iou
    return seeds


def detect_layout(output_shapes: Shapes, input_hw: tuple[int, int]) -> DetectionLayout | None:
    """The layout of a single-output YOLO model, where its shape and the input size leave no doubt.

    ``[1, 4 + C, N]`` with one anchor per cell of the 8/16/32(/64) pyramid is yolov8; ``[1, N, 5 + C]``
    with three anchors per cell is yolov5. Anything else, a transposed yolov8 ``[1, N, 4 + C]``
    included (indistinguishable from an anchor-free model with objectness), gives None: declare it.
    Separate box and score outputs are never guessed: box format and activation are not in the shapes.
    """
    if len(output_shapes) != 1:
        return None
    (name, shape), = output_shapes.items()
    if len(shape) != 3 or shape[0] != 1:
        return None
    cells = {sum(math.ceil(input_hw[0] / s) * math.ceil(input_hw[1] / s) for s in strides) for strides in YOLO_STRIDES}
    _, first, second = shape
    if second in cells and 5 <= first < second:
        return DetectionLayout("yolov8", output=name)
    if first in {3 * c for c in cells} and 6 <= second < first:
        return DetectionLayout("yolov5", output=name)
    return None


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
        iou_threshold: float) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Greedy class-wise non-maximum suppression over xyxy ``boxes``.

    Returns (kept index, the indices it suppressed, their IoU with it) for every kept box, best
    score first (ties: lower index first). A box is suppressed by the first better box of its class
    still kept whose IoU with it exceeds ``iou_threshold``.
    """
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []
    for label in np.unique(labels):
        members = order[labels[order] == label]
        alive = np.ones(len(members), bool)
        for position, index in enumerate(members):
            if not alive[position]:
                continue
            rest = position + 1 + np.flatnonzero(alive[position + 1:])
            overlap = iou(boxes[index], boxes[members[rest]])
            hit = overlap > iou_threshold
            alive[rest[hit]] = False
            kept.append((int(index), members[rest[hit]], overlap[hit]))
    rank = {int(index): position for position, index in enumerate(order)}
    return sorted(kept, key=lambda item: rank[item[0]])


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes``; 0 where the union is empty."""
    low = np.maximum(box[:2], boxes[:, :2])
    high = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    union = _area(box[None])[0] + _area(boxes) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)


def _one_of(field: str, value: object, choices: object) -> None:
    if value not in get_args(choices):
        raise invalid(field, f"'{value}' is not one of {', '.join(get_args(choices))}")


def _check_shapes(layout: DetectionLayout, shapes: Shapes) -> None:
    """Refuse outputs whose shapes do not fit the declared layout, naming the output."""
    def fail(name: str, expected: str) -> InvalidModelError:
        return InvalidModelError(f"output '{name}' has shape {list(shapes[name])}; layout {layout.layout} expects {expected}")

    if layout.output is not None:
        shape = shapes[layout.output]
        minimum = 5 if layout.layout == "yolov8" else 6
        axis = 1 if layout.layout == "yolov8" else 2
        if len(shape) != 3 or shape[0] != 1 or shape[axis] < minimum:
            raise fail(layout.output, "[1, 4 + C, N]" if layout.layout == "yolov8" else "[1, N, 5 + C]")
        return
    classes = None
    for head in layout.heads:
        scores, boxes = shapes[head.scores], shapes[head.boxes]
        if len(scores) != 3 or scores[0] != 1 or (classes is not None and scores[2] != classes):
            raise fail(head.scores, f"[1, N, C] with the same C on every head (C = {classes})")
        classes = scores[2]
        if layout.background is not None and not 0 <= layout.background < classes:
            raise invalid("task.background", f"{layout.background} is not a class of output '{head.scores}' ({classes} classes)")
        width = boxes[2] if len(boxes) == 3 else 0
        fits = width % 4 == 0 and width >= 8 if layout.box_format == "ltrb_dfl" else width == 4
        if len(boxes) != 3 or boxes[0] != 1 or boxes[1] != scores[1] or not fits:
            expected = "4 (R + 1), R >= 1" if layout.box_format == "ltrb_dfl" else "4"
            raise fail(head.boxes, f"[1, {scores[1]}, {expected}] beside scores '{head.scores}'")


def _anchor_boxes_and_scores(outputs: Mapping[str, np.ndarray], layout: DetectionLayout,
                             input_hw: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Every anchor's xyxy box in input pixels ``[A, 4]`` and class probabilities ``[A, C]``."""
    if layout.layout == "yolov8":
        table = np.asarray(outputs[layout.output][0], np.float64).T  # [N, 4 + C]
        return _xyxy(table[:, :4], "cxcywh"), _activate(table[:, 4:], layout.score_activation)
    if layout.layout == "yolov5":
        table = np.asarray(outputs[layout.output][0], np.float64)  # [N, 5 + C]
        objectness = _activate(table[:, 4:5], layout.score_activation)
        return _xyxy(table[:, :4], "cxcywh"), objectness * _activate(table[:, 5:], layout.score_activation)
    if (layout.normalized or layout.box_format == "ltrb_dfl") and input_hw is None:
        raise invalid("input_hw", f"is needed to decode {'normalised' if layout.normalized else 'ltrb_dfl'} boxes")
    boxes, scores = [], []
    for head in layout.heads:
        raw = np.asarray(outputs[head.boxes][0], np.float64)
        if layout.box_format == "ltrb_dfl":
            boxes.append(_dfl_boxes(raw, head.stride, input_hw))  # type: ignore[arg-type]
        else:
            boxes.append(_xyxy(raw, layout.box_format))
        scores.append(_activate(np.asarray(outputs[head.scores][0], np.float64), layout.score_activation))
    box, score = np.concatenate(boxes), np.concatenate(scores)
    if layout.normalized:
        height, width = input_hw  # type: ignore[misc]
        box = box * np.array([width, height, width, height], np.float64)
    if layout.background is not None:
        score[:, layout.background] = -np.inf
    return box, score


def _xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    centre, size = boxes[:, :2], boxes[:, 2:4]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def _dfl_boxes(raw: np.ndarray, stride: int, input_hw: tuple[int, int]) -> np.ndarray:
    """PP-PicoDet/GFL boxes: each side's distance is the mean of a softmax over R + 1 bins, in
    strides, from the anchor point at the centre of its grid cell (cells row-major, ceil(H / stride)
    rows)."""
    rows, cols = (math.ceil(side / stride) for side in input_hw)
    if raw.shape[0] != rows * cols:
        raise InvalidModelError(f"a stride-{stride} head of a {input_hw[0]}x{input_hw[1]} input has {rows}x{cols} "
                                f"anchor points, but its boxes have {raw.shape[0]}")
    bins = raw.reshape(len(raw), 4, -1)
    distance = (_activate(bins, "softmax") * np.arange(bins.shape[-1])).sum(axis=-1) * stride  # l, t, r, b
    y, x = np.divmod(np.arange(rows * cols), cols)
    centre = (np.stack([x, y], axis=1) + 0.5) * stride
    return np.concatenate([centre - distance[:, :2], centre + distance[:, 2:]], axis=1)


def _activate(values: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return 0.5 * (1 + np.tanh(values / 2))  # = 1 / (1 + exp(-x)), without overflow
    if activation == "softmax":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return values
