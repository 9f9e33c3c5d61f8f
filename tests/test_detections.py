"""Detections and region seeds (gap_service.targets): decoding against a brute-force decoder and
the torch detectors' own post-processing, NMS against brute force and OpenCV, layouts detected or
refused, seeds, region-seed errors, and the bundled PP-PicoDet layout detector on real inputs."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from gap_service.errors import InvalidInputError, InvalidModelError
from gap_service.preprocess import preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.targets import (
    Detection,
    DetectionLayout,
    Head,
    ScoreRef,
    decode,
    detect_layout,
    detection_seed,
    nms,
    region_seed,
    score_entries,
)
from support.detectors import DETECTOR_CASES, detector_case, detector_input, export_detector

Outputs = dict[str, np.ndarray]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# --------------------------------------------------------------------------------------
# Brute-force references: one anchor, one class, one box pair at a time
# --------------------------------------------------------------------------------------


def brute_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def brute_nms(boxes: list, scores: list, labels: list, threshold: float) -> list[tuple[int, dict[int, float]]]:
    """Kept indices best first, each with {index it suppressed: IoU}: a box goes to the first better
    kept box of its class that overlaps it by more than the threshold."""
    kept: list[tuple[int, dict[int, float]]] = []
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        for k, merged in kept:
            overlap = brute_iou(boxes[k], boxes[i])
            if labels[k] == labels[i] and overlap > threshold:
                merged[i] = overlap
                break
        else:
            kept.append((i, {}))
    return kept


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def activate(values: list[float], activation: str) -> list[float]:
    if activation == "sigmoid":
        return [sigmoid(v) for v in values]
    if activation == "softmax":
        total = sum(math.exp(v) for v in values)
        return [math.exp(v) / total for v in values]
    return list(values)


def brute_anchors(outputs: Outputs, task: dict[str, Any], input_hw: tuple[int, int]) -> list[tuple]:
    """Per anchor: (xyxy box, class probabilities, [per class: the raw multi-indices of its entries])."""
    act = task.get("score_activation", "none")
    anchors = []
    if task["layout"] == "yolov8":
        out = outputs[task["output"]]
        for a in range(out.shape[2]):
            cx, cy, w, h = (float(out[0, j, a]) for j in range(4))
            probs = activate([float(out[0, 4 + c, a]) for c in range(out.shape[1] - 4)], act)
            entries = [[("output0", (0, 4 + c, a))] for c in range(len(probs))]
            anchors.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), probs, entries))
        return anchors
    if task["layout"] == "yolov5":
        out = outputs[task["output"]]
        for a in range(out.shape[1]):
            cx, cy, w, h = (float(out[0, a, j]) for j in range(4))
            objectness = activate([float(out[0, a, 4])], act)[0]
            probs = [objectness * p for p in activate([float(v) for v in out[0, a, 5:]], act)]
            entries = [[("output0", (0, a, 5 + c)), ("output0", (0, a, 4))] for c in range(len(probs))]
            anchors.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), probs, entries))
        return anchors
    height, width = input_hw
    for head in task["heads"]:
        scores, raw = outputs[head["scores"]], outputs[head["boxes"]]
        for k in range(scores.shape[1]):
            probs = activate([float(v) for v in scores[0, k]], act)
            if task.get("background") is not None:
                probs[task["background"]] = 0.0
            values = [float(v) for v in raw[0, k]]
            box_format = task.get("box_format", "xyxy")
            if box_format == "ltrb_dfl":
                stride, bins = head["stride"], len(values) // 4
                row, column = divmod(k, math.ceil(width / stride))
                x, y = (column + 0.5) * stride, (row + 0.5) * stride
                d = [sum(i * p for i, p in enumerate(activate(values[s * bins:(s + 1) * bins], "softmax"))) * stride
                     for s in range(4)]
                box = (x - d[0], y - d[1], x + d[2], y + d[3])
            elif box_format == "cxcywh":
                cx, cy, w, h = values
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            else:
                box = tuple(values)
            if task.get("normalized"):
                box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
            anchors.append((box, probs, [[(head["scores"], (0, k, c))] for c in range(len(probs))]))
    return anchors


def brute_decode(outputs: Outputs, task: dict[str, Any], threshold: float, iou_threshold: float,
                 input_hw: tuple[int, int]) -> list[dict[str, Any]]:
    anchors = brute_anchors(outputs, task, input_hw)
    candidates = [(a, c) for a, (_, probs, _) in enumerate(anchors) for c, p in enumerate(probs) if p > threshold]
    boxes = [anchors[a][0] for a, _ in candidates]
    scores = [anchors[a][1][c] for a, c in candidates]
    labels = [c for _, c in candidates]
    found = []
    for kept, merged in brute_nms(boxes, scores, labels, iou_threshold):
        anchor, label = candidates[kept]
        found.append({"anchor": anchor, "label": label, "score": scores[kept], "box": boxes[kept],
                      "entries": anchors[anchor][2][label],
                      "merged": {candidates[i][0]: iou for i, iou in merged.items()}})
    return found


# --------------------------------------------------------------------------------------
# Random raw outputs of every layout, boxes in clusters so that NMS merges some
# --------------------------------------------------------------------------------------


def _cluster_boxes(rng: np.random.Generator, n: int, hw: tuple[int, int]) -> np.ndarray:
    """[n, 4] cx, cy, w, h around four cluster centres."""
    centres = rng.uniform(0.2, 0.8, (4, 2)) * np.array(hw[::-1])
    cxcy = centres[rng.integers(0, 4, n)] + rng.normal(0, 2, (n, 2))
    return np.concatenate([cxcy, rng.uniform(8, 16, (n, 2))], axis=1)


def yolov8_outputs(rng: np.random.Generator) -> tuple[Outputs, dict[str, Any]]:
    boxes = _cluster_boxes(rng, 60, (64, 64))
    table = np.concatenate([boxes, rng.uniform(0, 1, (60, 3))], axis=1)
    return {"output0": table.T[None].astype(np.float32)}, {"layout": "yolov8", "output": "output0"}


def yolov5_outputs(rng: np.random.Generator) -> tuple[Outputs, dict[str, Any]]:
    boxes = _cluster_boxes(rng, 60, (64, 64))
    table = np.concatenate([boxes, rng.normal(0, 2, (60, 5))], axis=1)
    return ({"output0": table[None].astype(np.float32)},
            {"layout": "yolov5", "output": "output0", "score_activation": "sigmoid"})


def xyxy_sigmoid_outputs(rng: np.random.Generator) -> tuple[Outputs, dict[str, Any]]:
    cxcywh = _cluster_boxes(rng, 50, (64, 64))
    xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
    return ({"scores": rng.normal(0, 2, (1, 50, 4)).astype(np.float32), "boxes": xyxy[None].astype(np.float32)},
            {"layout": "boxes_scores", "heads": [{"scores": "scores", "boxes": "boxes"}], "score_activation": "sigmoid"})


def normalized_softmax_outputs(rng: np.random.Generator) -> tuple[Outputs, dict[str, Any]]:
    boxes = _cluster_boxes(rng, 50, (64, 64)) / 64
    return ({"scores": rng.normal(0, 2, (1, 50, 4)).astype(np.float32), "boxes": boxes[None].astype(np.float32)},
            {"layout": "boxes_scores", "heads": [{"scores": "scores", "boxes": "boxes"}], "box_format": "cxcywh",
             "normalized": True, "score_activation": "softmax", "background": 0})


def dfl_outputs(rng: np.random.Generator) -> tuple[Outputs, dict[str, Any]]:
    # a 40x24 input: stride 8 gives 5x3 points, stride 16 gives ceil: 3x2
    outputs = {"s8": rng.uniform(0, 1, (1, 15, 3)), "b8": rng.normal(0, 2, (1, 15, 32)),
               "s16": rng.uniform(0, 1, (1, 6, 3)), "b16": rng.normal(0, 2, (1, 6, 32))}
    return ({k: v.astype(np.float32) for k, v in outputs.items()},
            {"layout": "boxes_scores", "box_format": "ltrb_dfl",
             "heads": [{"scores": "s8", "boxes": "b8", "stride": 8}, {"scores": "s16", "boxes": "b16", "stride": 16}]})


RANDOM_LAYOUTS: dict[str, tuple[Callable, tuple[int, int]]] = {
    "yolov8": (yolov8_outputs, (64, 64)),
    "yolov5_logits": (yolov5_outputs, (64, 64)),
    "xyxy_sigmoid": (xyxy_sigmoid_outputs, (64, 64)),
    "cxcywh_normalized_softmax_background": (normalized_softmax_outputs, (64, 64)),
    "ltrb_dfl_two_heads": (dfl_outputs, (40, 24)),
}


def assert_same(detections: list[Detection], expected: list[dict[str, Any]], outputs: Outputs) -> None:
    assert [(d.kept.anchor, d.label) for d in detections] == [(e["anchor"], e["label"]) for e in expected]
    for d, e in zip(detections, expected):
        np.testing.assert_allclose(d.box, e["box"], rtol=1e-6, atol=1e-4)
        assert d.score == pytest.approx(e["score"], rel=1e-6, abs=1e-7)
        raw = [(name, np.unravel_index(flat, outputs[name].shape)) for name, flat in d.kept.entries]
        assert raw == e["entries"]
        assert {r.anchor: r.iou for r in d.merged} == pytest.approx(e["merged"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(RANDOM_LAYOUTS))
def test_decode_equals_brute_force(name: str, seed: int) -> None:
    make, hw = RANDOM_LAYOUTS[name]
    outputs, task = make(np.random.default_rng(seed))
    layout = DetectionLayout.from_config({"kind": "detection", **task})
    detections = decode(outputs, layout, 0.3, 0.4, max_detections=1000, input_hw=hw)
    expected = brute_decode(outputs, task, 0.3, 0.4, hw)
    assert len(expected) >= 3 and any(e["merged"] for e in expected)
    assert_same(detections, expected, outputs)
    for d in detections:  # every merged anchor's entries hold its own score for the same class
        for ref in d.merged:
            assert ref.entries == score_entries(layout, {k: v.shape for k, v in outputs.items()}, ref.anchor, d.label)
    assert decode(outputs, layout, 0.3, 0.4, max_detections=2, input_hw=hw) == detections[:2]


def test_nms_equals_brute_force_and_opencv() -> None:
    rng = np.random.default_rng(3)
    cxcywh = _cluster_boxes(rng, 300, (64, 64))
    boxes = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
    boxes[:5, 2:] = boxes[:5, :2]  # empty boxes: IoU 0 with everything
    scores, labels = rng.uniform(0, 1, 300), rng.integers(0, 3, 300)
    for threshold in (0.0, 0.3, 0.6, 1.0):
        found = nms(boxes, scores, labels, threshold)
        expected = brute_nms(boxes.tolist(), scores.tolist(), labels.tolist(), threshold)
        assert [k for k, _, _ in found] == [k for k, _ in expected]
        for (_, merged, ious), (_, reference) in zip(found, expected):
            assert dict(zip(merged.tolist(), ious.tolist())) == pytest.approx(reference)
        # OpenCV counts two empty boxes as identical: compare it on the non-empty ones
        xywh = np.concatenate([boxes[5:, :2], boxes[5:, 2:] - boxes[5:, :2]], axis=1)
        opencv = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores[5:].tolist(), labels[5:].tolist(), 0.0, threshold)
        kept = [k for k, _, _ in nms(boxes[5:], scores[5:], labels[5:], threshold)]
        assert sorted(int(i) for i in np.ravel(opencv)) == sorted(kept)
    tied = nms(np.array([[0, 0, 1, 1], [0, 0, 1, 1]], float), np.array([0.5, 0.5]), np.array([0, 0]), 0.5)
    assert [(k, m.tolist()) for k, m, _ in tied] == [(0, [1])]  # ties: the lower index is kept


@pytest.mark.parametrize("name", sorted(DETECTOR_CASES))
def test_torch_heads_decode_like_their_own_postprocessing(name: str) -> None:
    case = detector_case(name)
    session = ort.InferenceSession(export_detector(case), providers=["CPUExecutionProvider"])
    image = detector_input(case)
    outputs = dict(zip(case.output_names, session.run(None, {"input": image})))
    with torch.no_grad():
        raw = case.module(torch.from_numpy(image))
    raw = raw if isinstance(raw, tuple) else (raw,)
    reference = case.module.postprocess(raw, 0.25, 0.45)
    detections = decode(outputs, DetectionLayout.from_config(case.task), 0.25, 0.45, input_hw=case.input_shape[2:])
    assert len(detections) >= 3 and any(d.merged for d in detections)
    assert [(d.kept.anchor, d.label) for d in detections] == [(anchor, label) for _, _, label, anchor in reference]
    for d, (box, score, _, _) in zip(detections, reference):
        np.testing.assert_allclose(d.box, box, atol=1e-3)
        assert d.score == pytest.approx(score, abs=1e-5)
    shapes = {k: v.shape for k, v in outputs.items()}
    declared = DetectionLayout.from_config(case.task)
    assert detect_layout(shapes, case.input_shape[2:]) == (None if name == "fpn_tiny" else declared)


def test_layouts_detected_where_unambiguous() -> None:
    assert detect_layout({"output0": (1, 84, 8400)}, (640, 640)) == DetectionLayout("yolov8", output="output0")
    assert detect_layout({"output0": (1, 84, 2100)}, (320, 320)) == DetectionLayout("yolov8", output="output0")
    assert detect_layout({"out": (1, 25200, 85)}, (640, 640)) == DetectionLayout("yolov5", output="out")
    assert detect_layout({"out": (1, 25500, 85)}, (640, 640)) == DetectionLayout("yolov5", output="out")  # P6
    assert detect_layout({"output0": (1, 15, 5040)}, (384, 640)) == DetectionLayout("yolov8", output="output0")
    refused = [
        {"output0": (1, 8400, 84)},  # transposed yolov8, or anchor-free with objectness: declare it
        {"output0": (1, 84, 8000)},  # not the anchor count of a 640x640 pyramid
        {"output0": (1, 84, 8400), "protos": (1, 32, 160, 160)},  # a segmentation model
        {"logits": (1, 1000)},
        {"map": (1, 1, 640, 640)},
        {"output0": (2, 84, 8400)},
        {"scores": (1, 8400, 80), "boxes": (1, 8400, 4)},  # box format and activation unknown
    ]
    for shapes in refused:
        assert detect_layout(shapes, (640, 640)) is None, shapes


@pytest.mark.parametrize(("task", "field"), [
    ({"kind": "segmentation"}, "task.kind"),
    ({"kind": "detection", "layout": "yolov9", "output": "o"}, "task.layout"),
    ({"kind": "detection", "layout": "yolov8", "output": "o", "anchors": 3}, "task"),
    ({"kind": "detection", "layout": "yolov8"}, "task.output"),
    ({"kind": "detection", "layout": "yolov8", "output": "o", "score_activation": "softmax"}, "task.box_format"),
    ({"kind": "detection", "layout": "yolov5", "output": "o", "box_format": "xyxy"}, "task.box_format"),
    ({"kind": "detection", "layout": "boxes_scores", "output": "o"}, "task.heads"),
    ({"kind": "detection", "layout": "boxes_scores", "heads": [{"scores": "s"}]}, "task.heads[0]"),
    ({"kind": "detection", "layout": "boxes_scores", "box_format": "ltrb_dfl", "heads": [{"scores": "s", "boxes": "b"}]},
     "task.heads"),
    ({"kind": "detection", "layout": "boxes_scores", "box_format": "xywh", "heads": [{"scores": "s", "boxes": "b"}]},
     "task.box_format"),
    ({"kind": "detection", "layout": "boxes_scores", "score_activation": "relu",
      "heads": [{"scores": "s", "boxes": "b"}]}, "task.score_activation"),
    ({"kind": "detection", "layout": "boxes_scores", "box_format": "ltrb_dfl",
      "heads": [{"scores": "s", "boxes": "b", "stride": "8"}]}, "task.heads"),
    ({"kind": "detection", "layout": "yolov8", "output": "o", "background": 0}, "task.background"),
])
def test_bad_layouts_are_refused_naming_the_field(task: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        DetectionLayout.from_config(task)
    assert [v.field for v in error.value.violations] == [field]


def test_outputs_that_do_not_fit_the_layout_are_refused() -> None:
    v8 = DetectionLayout("yolov8", output="output0")
    with pytest.raises(InvalidModelError, match=r"output 'output0' has shape \[1, 8400\]; layout yolov8"):
        decode({"output0": np.zeros((1, 8400), np.float32)}, v8)
    with pytest.raises(InvalidModelError, match="outputs \\['output0'\\] that the model did not return"):
        decode({"logits": np.zeros((1, 7, 20), np.float32)}, v8)
    two = DetectionLayout("boxes_scores", heads=(Head("s", "b"), Head("s2", "b2")))
    outputs = {"s": np.zeros((1, 10, 3)), "b": np.zeros((1, 10, 4)), "s2": np.zeros((1, 5, 2)), "b2": np.zeros((1, 5, 4))}
    with pytest.raises(InvalidModelError, match="output 's2'.*same C on every head"):
        decode(outputs, two)
    with pytest.raises(InvalidModelError, match="output 'b'.*beside scores 's'"):
        decode({"s": np.zeros((1, 10, 3)), "b": np.zeros((1, 9, 4))}, DetectionLayout("boxes_scores", heads=(Head("s", "b"),)))
    dfl = DetectionLayout("boxes_scores", heads=(Head("s", "b", 8),), box_format="ltrb_dfl")
    dfl_raw = {"s": np.zeros((1, 10, 3)), "b": np.zeros((1, 10, 32))}
    with pytest.raises(InvalidInputError, match="input_hw"):
        decode(dfl_raw, dfl)
    with pytest.raises(InvalidModelError, match="has 4x4 anchor points, but its boxes have 10"):
        decode(dfl_raw, dfl, input_hw=(32, 32))
    ssd = DetectionLayout("boxes_scores", heads=(Head("s", "b"),), score_activation="softmax", background=3)
    with pytest.raises(InvalidInputError, match="3 is not a class of output 's' \\(3 classes\\)"):
        decode({"s": np.zeros((1, 10, 3)), "b": np.zeros((1, 10, 4))}, ssd)
    assert decode({"output0": np.zeros((1, 7, 20))}, v8) == []  # no candidate
    for keyword, value in (("score_threshold", 1.0), ("iou_threshold", -0.1), ("max_detections", 0)):
        with pytest.raises(InvalidInputError) as error:
            decode({"output0": np.zeros((1, 7, 20))}, v8, **{keyword: value})
        assert error.value.violations[0].field == keyword


@functools.cache
def torch_detections(name: str) -> tuple[Outputs, list[Detection]]:
    case = detector_case(name)
    session = ort.InferenceSession(export_detector(case), providers=["CPUExecutionProvider"])
    outputs = dict(zip(case.output_names, session.run(None, {"input": detector_input(case)})))
    return outputs, decode(outputs, DetectionLayout.from_config(case.task), 0.25, 0.45, input_hw=case.input_shape[2:])


@pytest.mark.parametrize("name", sorted(DETECTOR_CASES))
def test_detection_seed_is_the_kept_score_or_the_iou_weighted_merge(name: str) -> None:
    outputs, detections = torch_detections(name)
    shapes = {k: v.shape for k, v in outputs.items()}

    def entries_sum(ref: ScoreRef) -> float:
        return sum(float(outputs[output].flat[flat]) for output, flat in ref.entries)

    for d in detections:
        seeds = detection_seed(d, shapes)
        assert set(seeds) == {output for output, _ in d.kept.entries} and all(seeds[k].shape == shapes[k] for k in seeds)
        assert sum(int(np.count_nonzero(s)) for s in seeds.values()) == len(d.kept.entries)
        assert all(set(np.unique(s)) == {0.0, 1.0} for s in seeds.values())
        decision = sum(float((seeds[k].astype(np.float64) * outputs[k]).sum()) for k in seeds)
        assert decision == pytest.approx(entries_sum(d.kept), rel=1e-6)
        spread = detection_seed(d, shapes, spread=True)
        assert set(spread) == set(d.outputs)
        weighted = sum(r.iou * entries_sum(r) for r in (d.kept, *d.merged))
        assert sum(float((spread[k].astype(np.float64) * outputs[k]).sum()) for k in spread) == pytest.approx(weighted, rel=1e-6)
    if name == "yolov5_tiny":  # the class score and the objectness of the kept anchor, weight 1 each
        d = detections[0]
        table = outputs["output0"][0]
        assert entries_sum(d.kept) == pytest.approx(table[d.kept.anchor, 5 + d.label] + table[d.kept.anchor, 4])
        assert d.score == pytest.approx(table[d.kept.anchor, 4] * table[d.kept.anchor, 5 + d.label], rel=1e-6)
    assert any(d.merged for d in detections)


def test_seed_and_entry_errors_name_the_field() -> None:
    outputs, detections = torch_detections("yolov8_tiny")
    d = detections[0]
    layout = DetectionLayout.from_config(detector_case("yolov8_tiny").task)
    cases = [
        (lambda: detection_seed(d, {}), "output"),
        (lambda: detection_seed(d, {"output0": (1, 7, 2)}), "detection"),
        (lambda: score_entries(layout, {"output0": (1, 7, 84)}, 0, 3), "class"),
        (lambda: score_entries(layout, {"output0": (1, 7, 84)}, 84, 0), "anchor"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInputError) as error:
            call()
        assert [v.field for v in error.value.violations] == [field]


def test_region_seed_follows_semantic_segmentation_target() -> None:
    rng = np.random.default_rng(0)
    output = rng.normal(size=(1, 3, 6, 8)).astype(np.float32)
    whole = region_seed(output.shape, 1)
    assert whole.dtype == np.float32 and whole.shape == output.shape
    assert whole[0, 1].all() and not whole[0, [0, 2]].any()
    mask = rng.uniform(size=(6, 8)) > 0.5
    seed = region_seed(output.shape, 2, mask=mask)
    # pytorch-grad-cam: (model_output[category, :, :] * mask).sum()
    assert float((seed * output).sum()) == pytest.approx(float((output[0, 2] * mask).sum()), rel=1e-6)
    weights = rng.uniform(size=(6, 8)).astype(np.float32)
    np.testing.assert_array_equal(region_seed(output.shape, 0, mask=weights)[0, 0], weights)
    for box in ((1.5, 0.4, 4.5, 3.0), (-5, -5, 2, 2), (0, 0, 8, 6), (6.6, 4.4, 100, 100)):
        covered = np.array([[box[0] <= j + 0.5 < box[2] and box[1] <= i + 0.5 < box[3] for j in range(8)] for i in range(6)])
        np.testing.assert_array_equal(region_seed(output.shape, 0, box=box)[0, 0], covered.astype(np.float32))
    nhwc = region_seed((1, 6, 8, 3), 1, box=(1.5, 0.4, 4.5, 3.0), channel_axis=-1)
    np.testing.assert_array_equal(nhwc[0, :, :, 1], region_seed(output.shape, 1, box=(1.5, 0.4, 4.5, 3.0))[0, 1])
    assert not nhwc[..., [0, 2]].any()
    assert np.array_equal(region_seed((1, 6, 8, 3), 2, channel_axis=3)[..., 2], np.ones((1, 6, 8), np.float32))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"channel": 3}, "region.channel"),
    ({"channel": -1}, "region.channel"),
    ({"box": (10, 10, 20, 20)}, "region.box"),
    ({"box": (3, 3, 3, 5)}, "region.box"),
    ({"box": (0, float("nan"), 4, 4)}, "region.box"),
    ({"box": (0, 0, 4)}, "region.box"),
    ({"mask": np.ones((8, 6))}, "region.mask"),
    ({"mask": np.full((6, 8), np.nan)}, "region.mask"),
    ({"mask": np.zeros((6, 8))}, "region.mask"),
    ({"mask": np.full((6, 8), "x")}, "region.mask"),
    ({"box": (0, 0, 2, 2), "mask": np.ones((6, 8))}, "region"),
    ({"output_shape": (1, 3, 48)}, "region.output"),
    ({"output_shape": (2, 3, 6, 8)}, "region.output"),
    ({"channel_axis": 2}, "region.channel_axis"),
])
def test_bad_regions_are_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    arguments = {"output_shape": (1, 3, 6, 8), "channel": 0, **kwargs}
    with pytest.raises(InvalidInputError) as error:
        region_seed(**arguments)
    assert [v.field for v in error.value.violations] == [field]


# --------------------------------------------------------------------------------------
# The bundled PP-PicoDet layout detector on real inputs
# --------------------------------------------------------------------------------------

# The config "task" proposed for models/picodet_layout_cdla (docs/targets.md): strides 8..64, 8 DFL bins.
PICODET_TASK = {
    "kind": "detection", "layout": "boxes_scores", "box_format": "ltrb_dfl", "score_activation": "none",
    "heads": [{"scores": f"transpose_{2 * i}.tmp_0", "boxes": f"transpose_{2 * i + 1}.tmp_0", "stride": stride}
              for i, stride in enumerate((8, 16, 32, 64))],
}


@pytest.fixture(scope="module")
def picodet() -> Callable[[Image.Image], tuple[Outputs, list[Detection]]]:
    entry = load_repository(BUNDLED_REPOSITORY)["picodet_layout_cdla"]
    session = ort.InferenceSession(str(entry.path), providers=["CPUExecutionProvider"])
    layout = DetectionLayout.from_config(PICODET_TASK)

    def detect(image: Image.Image) -> tuple[Outputs, list[Detection]]:
        tensor, _ = preprocess(image.convert("RGB"), entry.config.preprocessing)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": tensor})))
        return outputs, decode(outputs, layout, 0.5, 0.5, input_hw=(800, 608))

    return detect


def test_picodet_finds_the_title_and_the_paragraphs_of_a_page(picodet) -> None:
    labels = load_repository(BUNDLED_REPOSITORY)["picodet_layout_cdla"].config.labels
    outputs, detections = picodet(Image.open(EXAMPLES / "page.png"))
    found = [labels[d.label] for d in detections]
    assert found.count("title") == 1 and found.count("text") >= 5 and set(found) == {"title", "text"}
    title = detections[found.index("title")]
    assert title.box[3] < 100 and all(d.box[1] > title.box[3] for d in detections if d is not title)
    assert all(20 < d.box[0] < 60 for d in detections)  # every block starts at the page's left margin
    spanning = [d for d in detections if len(d.outputs) > 1]  # anchors of two scales merged into one box
    assert spanning
    shapes = {k: v.shape for k, v in outputs.items()}
    seeds = detection_seed(spanning[0], shapes, spread=True)
    assert set(seeds) == set(spanning[0].outputs) and all(s.shape == shapes[k] for k, s in seeds.items())


def test_picodet_sees_a_photo_as_one_figure(picodet) -> None:
    _, detections = picodet(Image.open(EXAMPLES / "photos" / "astronaut.png"))
    assert detections and detections[0].label == 2  # figure
    x1, y1, x2, y2 = detections[0].box
    assert (x2 - x1) * (y2 - y1) > 0.9 * 800 * 608


# --------------------------------------------------------------------------------------
# The bundled BlazeFace face detector on the photos
# --------------------------------------------------------------------------------------

BLAZEFACE_TASK = {"kind": "detection", "layout": "boxes_scores", "box_format": "cxcywh", "score_activation": "sigmoid",
                  "heads": [{"scores": "classificators", "boxes": "boxes"}]}
# Faces measured by hand on the photos resized to 256x256 (x1, y1, x2, y2).
FACES = {"astronaut.png": (88, 38, 138, 90), "grace_hopper.jpg": (92, 58, 176, 146)}


def test_blazeface_finds_the_faces_of_the_photos_and_nothing_else() -> None:
    entry = load_repository(BUNDLED_REPOSITORY)["blazeface"]
    session = ort.InferenceSession(str(entry.path), providers=["CPUExecutionProvider"])
    layout = DetectionLayout.from_config(BLAZEFACE_TASK)
    for photo in ("astronaut.png", "grace_hopper.jpg", "coffee.png", "motorcycle_left.png", "rocket.jpg"):
        tensor, _ = preprocess(Image.open(EXAMPLES / "photos" / photo).convert("RGB"), entry.config.preprocessing)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": tensor})))
        faces = decode(outputs, layout, 0.5, 0.3)
        if photo not in FACES:
            assert faces == [], photo
            continue
        assert len(faces) == 1 and faces[0].score > 0.8 and brute_iou(faces[0].box, FACES[photo]) > 0.7, (photo, faces)
        seed = detection_seed(faces[0], {k: v.shape for k, v in outputs.items()}, spread=True)["classificators"]
        assert seed.flat[faces[0].kept.entries[0][1]] == 1 and np.count_nonzero(seed) == 1 + len(faces[0].merged) > 1
