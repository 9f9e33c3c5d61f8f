"""Tiny seeded torch detectors, exported to ONNX, for the detection decoder and detection seeds.

Three heads on one small backbone (strided convs to strides 8, 16 and 32 of a 64x64 input):

* ``yolov8_tiny``: anchor-free, one output ``[1, 4 + C, N]`` (cx, cy, w, h, class probabilities),
  concatenated over strides 8, 16, 32;
* ``yolov5_tiny``: three anchors per cell, one output ``[1, N, 5 + C]`` decoded as Ultralytics'
  YOLOv5 ``Detect`` layer does (sigmoid, then xy = (2 s - 0.5 + grid) * stride, wh = (2 s)^2 * anchor);
* ``fpn_tiny``: a top-down path (nearest Upsample + Add) and one shared RetinaNet-style head on
  P3 and P4, each scale with its own score output ``[1, N_i, C]`` (logits: no sigmoid in the graph)
  and box output ``[1, N_i, 4]`` (xyxy).

Random weights alone give no confident box, so each head adds a fixed prior to its class (and
objectness) logits: -6 everywhere, high at a few neighbouring anchors of two classes and scales, so
that every model yields a few confident detections that NMS merges with their neighbours. Each
module's ``postprocess`` is its own post-processing in torch (probabilities, candidates, class-wise
NMS by the class-offset trick), the reference the decoder is compared with.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import _finalize, _seeded

INPUT_SHAPE = (1, 3, 64, 64)
CLASSES = 3
# (stride, row, column, class, logit): the anchors the priors make confident, and their neighbours.
PRIORS = ((8, 3, 4, 1, 9.0), (8, 3, 5, 1, 7.0), (8, 4, 4, 1, 6.0), (16, 1, 2, 0, 8.0), (16, 2, 2, 0, 6.0))

Found = tuple[tuple[float, float, float, float], float, int, int]  # xyxy box, score, class, anchor


@dataclass(frozen=True)
class DetectorCase:
    """A seeded detector in eval mode, its ONNX output names and the config ``task`` describing them."""

    name: str
    module: nn.Module
    output_names: tuple[str, ...]
    task: dict[str, Any]
    input_shape: tuple[int, ...] = INPUT_SHAPE


def detector_case(name: str) -> DetectorCase:
    """A fresh instance of the detector called *name* (see :data:`DETECTOR_CASES`)."""
    try:
        return DETECTOR_CASES[name]()
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {sorted(DETECTOR_CASES)}") from None


def detector_input(case: DetectorCase, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal float32 image of the case's input shape."""
    return np.random.default_rng(seed).standard_normal(case.input_shape, dtype=np.float32)


def export_detector(case: DetectorCase, opset: int = 17) -> bytes:
    """The case as ONNX (TorchScript exporter, static shapes, one input "input"), cached per (name, opset)."""
    key = (case.name, opset)
    if key not in _EXPORTS:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(case.module, (torch.from_numpy(detector_input(case)),), buffer, dynamo=False,
                              opset_version=opset, input_names=["input"], output_names=list(case.output_names),
                              do_constant_folding=True)
        _EXPORTS[key] = buffer.getvalue()
    return _EXPORTS[key]


_EXPORTS: dict[tuple[str, int], bytes] = {}


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class _Backbone(nn.Module):
    """Strided 3x3 convs with ReLU: features at strides 8, 16 and 32."""

    def __init__(self, widths: tuple[int, int, int] = (16, 24, 32)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU())

        self.stem = nn.Sequential(block(3, 8), block(8, 12), block(12, widths[0]))
        self.down16 = block(widths[0], widths[1])
        self.down32 = block(widths[1], widths[2])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stem(x)
        p4 = self.down16(p3)
        return [p3, p4, self.down32(p4)]


def _prior(stride: int, channels: int, size: int, first_class: int = 0) -> torch.Tensor:
    """A [1, channels, size, size] logit prior: 0 on box channels, -6 on the class channels (from
    ``first_class`` on), except at the PRIORS of this stride."""
    prior = torch.zeros((1, channels, size, size))
    prior[:, first_class:first_class + CLASSES] = -6.0
    for s, row, column, label, logit in PRIORS:
        if s == stride:
            prior[0, first_class + label, row, column] = logit
    return prior


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major cell centres (x, y) of a size x size grid, in cells."""
    rows, columns = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                   indexing="ij")
    return columns.reshape(-1) + 0.5, rows.reshape(-1) + 0.5


def _ltrb_to_xyxy(distances: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    """[N, 4] left/top/right/bottom distances (input pixels) from the cell centres -> [N, 4] xyxy."""
    x, y = (c * stride for c in _grid(size))
    return torch.stack([x - distances[:, 0], y - distances[:, 1], x + distances[:, 2], y + distances[:, 3]], dim=1)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> list[int]:
    """Class-wise greedy NMS the way Ultralytics runs it: boxes shifted apart by class, one IoU matrix."""
    shifted = boxes + labels[:, None].to(boxes.dtype) * 4096.0
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    low = torch.maximum(shifted[:, None, :2], shifted[None, :, :2])
    high = torch.minimum(shifted[:, None, 2:], shifted[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(dim=2)
    area = (shifted[:, 2:] - shifted[:, :2]).clamp(min=0).prod(dim=1)
    overlap = inter / (area[:, None] + area[None, :] - inter)
    keep: list[int] = []
    for i in order:
        if all(overlap[i, k] <= iou_threshold for k in keep):
            keep.append(i)
    return keep


def _select(boxes: torch.Tensor, probabilities: torch.Tensor, score_threshold: float, iou_threshold: float) -> list[Found]:
    """Candidates (anchor, class) above the threshold, then class-wise NMS: best score first."""
    anchors, labels = torch.nonzero(probabilities > score_threshold, as_tuple=True)
    scores = probabilities[anchors, labels]
    keep = _nms(boxes[anchors], scores, labels, iou_threshold)
    return [(tuple(float(v) for v in boxes[anchors[i]]), float(scores[i]), int(labels[i]), int(anchors[i]))  # type: ignore[misc]
            for i in keep]


# --------------------------------------------------------------------------------------
# The three detectors
# --------------------------------------------------------------------------------------


class TinyYoloV8(nn.Module):
    """Anchor-free head: per cell 4 ltrb distances (softplus, at least one stride) and C class logits."""

    strides = (8, 16, 32)
    prediction_layers = ("heads",)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.heads = nn.ModuleList(nn.Conv2d(c, 4 + CLASSES, 1) for c in (16, 24, 32))
        for stride in self.strides:
            size = INPUT_SHAPE[2] // stride
            self.register_buffer(f"prior{stride}", _prior(stride, 4 + CLASSES, size, first_class=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = []
        for feature, head, stride in zip(self.backbone(x), self.heads, self.strides):
            size = INPUT_SHAPE[2] // stride
            flat = (head(feature) + getattr(self, f"prior{stride}")).reshape(4 + CLASSES, size * size)
            distances = (F.softplus(flat[:4]) + 1.0) * stride
            xyxy = _ltrb_to_xyxy(distances.T, stride, size)
            cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            columns.append(torch.cat([cxcywh.T, torch.sigmoid(flat[4:])], dim=0))
        return torch.cat(columns, dim=1)[None]  # [1, 4 + C, N]

    @staticmethod
    def postprocess(outputs: tuple[torch.Tensor, ...], score_threshold: float, iou_threshold: float) -> list[Found]:
        table = outputs[0][0].T
        xyxy = torch.cat([table[:, :2] - table[:, 2:4] / 2, table[:, :2] + table[:, 2:4] / 2], dim=1)
        return _select(xyxy, table[:, 4:], score_threshold, iou_threshold)


class TinyYoloV5(nn.Module):
    """Anchor-based head with objectness, decoded like Ultralytics' YOLOv5 ``Detect`` layer."""

    strides = (8, 16, 32)
    anchors = ((10.0, 13.0), (16.0, 30.0), (33.0, 23.0))  # one set, in input pixels, for every stride
    prediction_layers = ("heads",)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.outputs = 5 + CLASSES
        self.heads = nn.ModuleList(nn.Conv2d(c, 3 * self.outputs, 1) for c in (16, 24, 32))
        for stride in self.strides:
            size = INPUT_SHAPE[2] // stride
            prior = _prior(stride, self.outputs, size, first_class=5)
            prior[:, 4] = torch.where(prior[:, 5:].amax(dim=1) > 0, 8.0, -6.0)  # objectness where a class is
            self.register_buffer(f"prior{stride}", prior.repeat(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        anchor_grid = torch.tensor(self.anchors)[:, None, None, :]  # [3, 1, 1, 2]
        for feature, head, stride in zip(self.backbone(x), self.heads, self.strides):
            size = INPUT_SHAPE[2] // stride
            raw = head(feature) + getattr(self, f"prior{stride}")
            y = raw.reshape(3, self.outputs, size, size).permute(0, 2, 3, 1).sigmoid()  # [3, H, W, 5 + C]
            gx, gy = (c.reshape(size, size) - 0.5 for c in _grid(size))
            grid = torch.stack([gx, gy], dim=-1)[None]  # [1, H, W, 2]
            xy = (y[..., :2] * 2 - 0.5 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * anchor_grid
            rows.append(torch.cat([xy, wh, y[..., 4:]], dim=-1).reshape(-1, self.outputs))
        return torch.cat(rows)[None]  # [1, N, 5 + C]

    @staticmethod
    def postprocess(outputs: tuple[torch.Tensor, ...], score_threshold: float, iou_threshold: float) -> list[Found]:
        table = outputs[0][0]
        xyxy = torch.cat([table[:, :2] - table[:, 2:4] / 2, table[:, :2] + table[:, 2:4] / 2], dim=1)
        return _select(xyxy, table[:, 4:5] * table[:, 5:], score_threshold, iou_threshold)


class TinyFPN(nn.Module):
    """Top-down FPN (lateral 1x1 convs, nearest 2x Upsample + Add) with a head shared by P3 and P4."""

    strides = (8, 16)
    prediction_layers = ("classify", "regress")

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (16, 24))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, 1, 1) for _ in self.strides)
        self.tower = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU())
        self.classify = nn.Conv2d(width, CLASSES, 3, 1, 1)
        self.regress = nn.Conv2d(width, 4, 3, 1, 1)
        for stride in self.strides:
            self.register_buffer(f"prior{stride}", _prior(stride, CLASSES, INPUT_SHAPE[2] // stride))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c3, c4, _ = self.backbone(x)
        p4 = self.lateral[1](c4)
        p3 = self.lateral[0](c3) + self.upsample(p4)
        outputs: list[torch.Tensor] = []
        for feature, smooth, stride in zip((p3, p4), self.smooth, self.strides):
            size = INPUT_SHAPE[2] // stride
            tower = self.tower(smooth(feature))
            logits = self.classify(tower) + getattr(self, f"prior{stride}")
            distances = (F.softplus(self.regress(tower)) + 1.0) * stride
            outputs.append(logits.reshape(1, CLASSES, size * size).transpose(1, 2))  # [1, H W, C]
            outputs.append(_ltrb_to_xyxy(distances.reshape(4, size * size).T, stride, size)[None])  # [1, H W, 4]
        return tuple(outputs)  # scores_p3, boxes_p3, scores_p4, boxes_p4

    @staticmethod
    def postprocess(outputs: tuple[torch.Tensor, ...], score_threshold: float, iou_threshold: float) -> list[Found]:
        scores = torch.cat([outputs[0][0], outputs[2][0]]).sigmoid()
        boxes = torch.cat([outputs[1][0], outputs[3][0]])
        return _select(boxes, scores, score_threshold, iou_threshold)


def _case(name: str, module: Callable[[], nn.Module], output_names: tuple[str, ...], task: dict[str, Any],
          seed: int) -> DetectorCase:
    """Seeded weights, with the prediction convs scaled down so that the priors decide which anchors
    are confident and boxes of neighbouring anchors overlap enough for NMS to merge them."""
    with _seeded(seed):
        detector = _finalize(module())
    with torch.no_grad():
        for name_ in detector.prediction_layers:  # type: ignore[attr-defined]
            for layer in getattr(detector, name_).modules():
                if isinstance(layer, nn.Conv2d):
                    layer.weight *= 0.2
                    layer.bias *= 0.2
    return DetectorCase(name, detector, output_names, task)


DETECTOR_CASES: dict[str, Callable[[], DetectorCase]] = {
    "yolov8_tiny": lambda: _case("yolov8_tiny", TinyYoloV8, ("output0",),
                                 {"kind": "detection", "layout": "yolov8", "output": "output0"}, seed=80),
    "yolov5_tiny": lambda: _case("yolov5_tiny", TinyYoloV5, ("output0",),
                                 {"kind": "detection", "layout": "yolov5", "output": "output0"}, seed=50),
    "fpn_tiny": lambda: _case("fpn_tiny", TinyFPN, ("scores_p3", "boxes_p3", "scores_p4", "boxes_p4"),
                              {"kind": "detection", "layout": "boxes_scores", "box_format": "xyxy",
                               "score_activation": "sigmoid",
                               "heads": [{"scores": "scores_p3", "boxes": "boxes_p3"},
                                         {"scores": "scores_p4", "boxes": "boxes_p4"}]}, seed=40),
}
