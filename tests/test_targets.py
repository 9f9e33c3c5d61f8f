"""Decisions other than "the top class" (docs/targets.md): detections, regions, elements and seeds
decomposed like a class, against torch autograd (one call per node, the same seed) on the torch
detectors and a torch segmenter, and on the real PicoDet and DBNet graphs segment by segment;
layers found by target (a detection's head branch); Grad-CAM and LayerCAM as pytorch-grad-cam
defines them with its target classes; the YOLO case without a target; bad targets refused, naming
the field."""

from __future__ import annotations

import functools
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from gap_service import Explainer
from gap_service.cli import main
from gap_service.errors import InvalidInputError
from gap_service.explanation import Explanation
from gap_service.options import DetectionTarget, ElementTarget, RegionTarget
from gap_service.preprocess import preprocess
from gap_service.report import render_html
from gap_service.report.target import OUTLINE, draw_target
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.targets import decode, detection_seed
from support.detectors import DetectorCase, detector_case, detector_input, export_detector
from support.models import PADDLE_INPUT_SHAPES, PADDLE_MODELS, _finalize, _seeded, paddle_input
from support.reference import assert_same_tree, reference_tree, segments, whole_graph
from support.torch_oracle import TorchGraph

EXAMPLES = BUNDLED_REPOSITORY.parent / "examples"


# --------------------------------------------------------------------------------------
# Models: the torch detectors, a torch segmenter, the real detectors
# --------------------------------------------------------------------------------------


@functools.cache
def detector(name: str) -> tuple[DetectorCase, Explainer, np.ndarray]:
    case = detector_case(name)
    return case, Explainer(export_detector(case), task=case.task), detector_input(case)


class TinySegmenter(nn.Module):
    """Strided conv features, a 1x1 classifier to 3 class maps and a bilinear x4 upsampling: logits [1, 3, 32, 32]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(12, 12, 3, 1, 1), nn.ReLU())
        self.classify = nn.Conv2d(12, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.classify(self.features(x)), scale_factor=4, mode="bilinear", align_corners=False)


@functools.cache
def segmenter() -> tuple[nn.Module, Explainer, np.ndarray]:
    with _seeded(3):
        module = _finalize(TinySegmenter())
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    return module, Explainer(buffer.getvalue(), task={"kind": "dense"}), x


def nodes(tree: Explanation) -> list[tuple]:
    return [(n.parent, n.level, n.layer, n.channel, n.score) for n in tree.nodes]


def axes(explainer: Explainer, layers: list[str]) -> list[int]:
    return [explainer.compiled().layer(name).channel_axis for name in layers]


def torch_outputs(case: DetectorCase, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = case.module(torch.from_numpy(x))
    return dict(zip(case.output_names, (t.numpy() for t in (out if isinstance(out, tuple) else (out,)))))


def torch_seed(case: DetectorCase, x: np.ndarray, index: int, class_index: int | None = None) -> dict[str, np.ndarray]:
    """The seed of detection ``index`` from the torch module's own post-processing: its class score
    (or ``class_index``'s) at its anchor (and the objectness for YOLOv5), where the layout keeps them."""
    outputs = torch_outputs(case, x)
    _, _, label, anchor = case.module.postprocess(tuple(torch.from_numpy(v) for v in outputs.values()), 0.25, 0.45)[index]
    label = label if class_index is None else class_index
    seeds = {name: np.zeros_like(value) for name, value in outputs.items()}
    layout = case.task["layout"]
    if layout == "yolov8":
        seeds["output0"][0, 4 + label, anchor] = 1
    elif layout == "yolov5":
        seeds["output0"][0, anchor, [4, 5 + label]] = 1
    else:
        first = outputs["scores_p3"].shape[1]
        name, local = ("scores_p3", anchor) if anchor < first else ("scores_p4", anchor - first)
        seeds[name][0, local, label] = 1
    return {name: seed for name, seed in seeds.items() if seed.any()}


# --------------------------------------------------------------------------------------
# Trees against torch autograd
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "target"), [
    ("yolov8_tiny", DetectionTarget(0)),
    ("yolov8_tiny", DetectionTarget(1, spread=True)),
    ("yolov5_tiny", DetectionTarget(0, spread=True)),
    ("fpn_tiny", DetectionTarget(1)),
    ("fpn_tiny", DetectionTarget(0, class_index=2)),
], ids=lambda v: v if isinstance(v, str) else f"{v.index}{'-spread' if v.spread else ''}{f'-class{v.class_index}' if v.class_index is not None else ''}")
def test_detection_trees_equal_the_torch_reference(name: str, target: DetectionTarget) -> None:
    case, explainer, x = detector(name)
    tree = explainer.explain(x, target=target, top_k=3, depth=2)
    outputs = torch_outputs(case, x)
    if target.spread:  # the IoU weights of the merged anchors: decode() is held to brute force in test_detections.py
        seeds = detection_seed(decode(outputs, explainer.compiled().task.detection)[target.index], {k: v.shape for k, v in outputs.items()},
                               spread=True)
    else:
        seeds = torch_seed(case, x, target.index, target.class_index)
    assert tree.explained.outputs == tuple(seeds) and (tree.root.layer,) == tuple(seeds)
    (root, seed), = seeds.items()
    assert tree.logit == pytest.approx(float((seed * outputs[root]).sum()), rel=1e-5)  # <seed, output> as torch computes it
    vjp, activations = whole_graph(TorchGraph(onnx.load_from_string(export_detector(case))), {"input": x}, tree.layers)
    expected = reference_tree(vjp, activations, root, seed, tree.root.channel, tree.layers, axes(explainer, tree.layers), 3, "net")
    assert_same_tree(nodes(tree), expected)


@pytest.mark.parametrize("target", [RegionTarget(1, box=(4, 6, 20, 18)), RegionTarget(2), "mask", ElementTarget((0, 0, 10, 12)), "seed"],
                         ids=["box", "whole-map", "mask", "element", "seed"])
def test_dense_trees_equal_the_torch_reference(target) -> None:
    module, explainer, x = segmenter()
    rng = np.random.default_rng(7)
    shape = (1, 3, 32, 32)
    seed = np.zeros(shape)
    if target == "mask":
        mask = rng.uniform(size=shape[2:]) > 0.7
        target, seed[0, 0] = RegionTarget(0, mask=mask), mask
    elif target == "seed":
        seed = rng.standard_normal(shape)
    elif isinstance(target, ElementTarget):
        seed[target.index] = 1
    elif target.box is not None:  # the pixels whose centres lie in the box: columns 4..19, rows 6..17
        seed[0, target.channel, 6:18, 4:20] = 1
    else:
        seed[0, target.channel] = 1
    options = {"seed": seed.astype(np.float32)} if isinstance(target, str) else {"target": target}
    tree = explainer.explain(x, top_k=3, depth=2, **options)
    with torch.no_grad():
        logits = module(torch.from_numpy(x)).numpy()
    assert tree.logit == pytest.approx(float((seed * logits).sum()), rel=1e-5)
    vjp, activations = whole_graph(TorchGraph(explainer.compiled().nm.model), {"input": x}, tree.layers)
    expected = reference_tree(vjp, activations, "logits", seed, tree.root.channel, tree.layers, axes(explainer, tree.layers), 3, "net")
    assert_same_tree(nodes(tree), expected)


@functools.cache
def picodet() -> tuple[Explainer, np.ndarray, np.ndarray]:
    entry = load_repository(BUNDLED_REPOSITORY)["picodet_layout_cdla"]
    x, picture = preprocess(Image.open(EXAMPLES / "page.png").convert("RGB"), entry.config.preprocessing)
    return entry.explainer(), x, picture


def test_picodet_detection_trees_equal_the_segment_reference() -> None:
    explainer, x, _ = picodet()
    found = explainer.detections(x)
    spanning = next(i for i, d in enumerate(found) if len(d.outputs) > 1)
    compiled = explainer.compiled()
    outputs = compiled.forward({"image": x}, compiled.task.detection.output_names)
    for target in (DetectionTarget(found.index(next(d for d in found if d.label == "title"))), DetectionTarget(spanning, spread=True)):
        tree = explainer.explain(x, target=target, top_k=2, depth=2)
        seeds = detection_seed(decode(outputs, compiled.task.detection, 0.5, 0.5, input_hw=(800, 608))[target.index],
                               {k: v.shape for k, v in outputs.items()}, spread=target.spread)
        assert set(tree.explained.outputs) == set(seeds) and tree.explained.box == pytest.approx(found[target.index].box)
        if len(seeds) > 1:  # spread over two heads: the root is the joined scores of all four, side by side
            parts = [h.scores for h in compiled.task.detection.heads]
            assert tree.root.layer == "+".join(parts)
            seed = np.concatenate([seeds.get(p, np.zeros(outputs[p].shape, np.float32)).reshape(-1) for p in parts])[None]
        else:
            (_, seed), = seeds.items()
        vjp, state = segments(compiled, {"image": x}, [tree.root.layer, *tree.layers])
        expected = reference_tree(vjp, state, tree.root.layer, seed, tree.root.channel, tree.layers,
                                  axes(explainer, tree.layers), 2, "net")
        assert_same_tree(nodes(tree), expected, tolerance=1e-3)


def test_dbnet_region_trees_equal_the_segment_reference() -> None:
    explainer = Explainer(PADDLE_MODELS["ppocr_det"], input_shapes=PADDLE_INPUT_SHAPES["ppocr_det"], task={"kind": "dense"})
    x = paddle_input("ppocr_det")
    compiled = explainer.compiled()
    logits = compiled.decision.logits  # the pre-sigmoid map, as for a classifier's logits
    assert compiled.decision.probabilities == "sigmoid_0.tmp_0"
    for target, region in ((None, np.ones((64, 64))), (RegionTarget(0, box=(8.2, 8, 40, 29.9)), None)):
        tree = explainer.explain(x, target=target, top_k=3, depth=2)
        seed = np.zeros((1, 1, 64, 64))
        seed[0, 0] = region if region is not None else 0
        if region is None:
            seed[0, 0, 8:30, 8:40] = 1
        assert tree.root.layer == logits and tree.explained.kind == "region"
        vjp, state = segments(compiled, {compiled.nm.model.graph.input[0].name: x}, [logits, *tree.layers])
        expected = reference_tree(vjp, state, logits, seed, 0, tree.layers, axes(explainer, tree.layers), 3, "net")
        assert_same_tree(nodes(tree), expected, tolerance=1e-3)


# --------------------------------------------------------------------------------------
# Grad-CAM and LayerCAM with pytorch-grad-cam's target classes
# --------------------------------------------------------------------------------------
# pytorch-grad-cam (jacobgil/pytorch-grad-cam): BaseCAM.forward runs the model with hooks on the
# target layer (ActivationsAndGradients), backpropagates sum(target(output) for each image), and
# computes ReLU(sum_k w_k A_k) per layer; GradCAM.get_cam_weights is np.mean(grads, axis=(2, 3)),
# LayerCAM uses ReLU(grads) * activations. Its targets: SemanticSegmentationTarget(category, mask)
# is (model_output[category, :, :] * mask).sum(); ClassifierOutputTarget(category) is
# model_output[category]. Re-implemented here (the package imports torchvision).


class SemanticSegmentationTarget:
    def __init__(self, category: int, mask: np.ndarray) -> None:
        self.category, self.mask = category, torch.from_numpy(mask)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return (model_output[self.category, :, :] * self.mask.to(model_output.device)).sum()


class ClassifierOutputTarget:
    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output[self.category]


def pytorch_grad_cam(model: nn.Module, layer: nn.Module, x: np.ndarray, target, flatten: bool = False) -> dict[str, np.ndarray]:
    """BaseCAM.forward for one image: activations and gradients hooked on ``layer``, then the CAMs
    (before scale_cam_image, which only rescales and resizes for display)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(hook)
    try:
        output = model(torch.from_numpy(x))
        loss = sum(target(o.reshape(-1) if flatten else o) for o in output)
        loss.backward()
    finally:
        handle.remove()
    activations, grads = captured["activation"].detach().numpy(), captured["gradient"].numpy()
    weights = np.mean(grads, axis=(2, 3))
    return {"gradcam": np.maximum((weights[:, :, None, None] * activations).sum(axis=1), 0)[0],
            "layercam": np.maximum((np.maximum(grads, 0) * activations).sum(axis=1), 0)[0]}


def test_cams_of_a_region_equal_pytorch_grad_cam() -> None:
    module, explainer, x = segmenter()
    mask = np.zeros((32, 32), np.float32)
    mask[6:18, 4:20] = 1
    tree = explainer.explain(x, target=RegionTarget(1, box=(4, 6, 20, 18)), top_k=2, depth=1)
    assert tree.layers[0] == "/features/features.5/Relu_output_0"
    reference = pytorch_grad_cam(module, module.features[5], x, SemanticSegmentationTarget(1, mask))
    for name, ref in reference.items():
        np.testing.assert_allclose(tree.cams[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


@pytest.mark.parametrize("index", [0, 1])
def test_cams_of_a_detection_equal_pytorch_grad_cam(index: int) -> None:
    case, explainer, x = detector("yolov8_tiny")
    tree = explainer.explain(x, target=DetectionTarget(index), top_k=2, depth=1)
    (root, seed), = torch_seed(case, x, index).items()
    module = {"/backbone/stem/stem.2/stem.2.1/Relu_output_0": case.module.backbone.stem[2][1],
              "/backbone/down16/down16.1/Relu_output_0": case.module.backbone.down16[1]}[tree.layers[0]]
    reference = pytorch_grad_cam(case.module, module, x, ClassifierOutputTarget(int(np.flatnonzero(seed)[0])), flatten=True)
    for name, ref in reference.items():
        np.testing.assert_allclose(tree.cams[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


# --------------------------------------------------------------------------------------
# Layers found by target
# --------------------------------------------------------------------------------------


BRANCHES = {  # stride -> the backbone map of the tiny detectors' head at that stride
    8: "/backbone/stem/stem.2/stem.2.1/Relu_output_0",
    16: "/backbone/down16/down16.1/Relu_output_0",
    32: "/backbone/down32/down32.1/Relu_output_0",
}


@pytest.mark.parametrize("name", ["yolov8_tiny", "yolov5_tiny"])
def test_a_seed_at_one_head_scale_is_explained_by_that_head_branch(name: str) -> None:
    case, explainer, x = detector(name)
    per_cell = 3 if name == "yolov5_tiny" else 1
    starts = {8: 0, 16: 64 * per_cell, 32: 80 * per_cell}
    for stride, anchor in starts.items():
        for column in (0, 4 + (name == "yolov5_tiny")):  # a box coordinate, a class score (objectness for yolov5)
            index = (0, column, anchor) if name == "yolov8_tiny" else (0, anchor + per_cell - 1, column)
            tree = explainer.explain(x, target=ElementTarget(index), top_k=1, depth=2)
            assert tree.layers[0] == BRANCHES[stride], (stride, column)
            first = explainer.compiled().seeded_layers("output0", _one_hot(explainer.compiled().shape("output0"), index))[0]
            assert first.name == BRANCHES[stride] and "every channel feeds it" in first.reason
    found = explainer.detections(x)
    for index, box in enumerate(found):
        tree = explainer.explain(x, target=DetectionTarget(index), top_k=1, depth=1)
        _, _, _, anchor = case.module.postprocess(tuple(torch.from_numpy(v) for v in torch_outputs(case, x).values()), 0.25, 0.45)[index]
        stride = max(s for s, start in starts.items() if anchor >= start)
        assert tree.layers[0] == BRANCHES[stride]


def _one_hot(shape: tuple[int, ...], index: tuple[int, ...]) -> np.ndarray:
    seed = np.zeros(shape, np.float32)
    seed[index] = 1
    return seed


def test_fpn_heads_are_explained_by_their_own_tower_and_every_branch_is_tapped() -> None:
    _, explainer, x = detector("fpn_tiny")
    compiled = explainer.compiled()
    p3 = compiled.seeded_layers("scores_p3", _one_hot((1, 64, 3), (0, 20, 1)))
    p4 = compiled.seeded_layers("scores_p4", _one_hot((1, 16, 3), (0, 5, 0)))
    assert p3[0].name == "/tower/tower.1/Relu_output_0" and p4[0].name == "/tower/tower.1_1/Relu_output_0"
    assert p3[0].spatial_shape == (8, 8) and p4[0].spatial_shape == (4, 4)
    assert [(o, i.name) for o, i in compiled.head_branches] == [("scores_p3", p3[0].name), ("scores_p4", p4[0].name)]
    copies = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Cast", "Slice", "Pad", "Concat"}
    for chain in (p3, p4):
        assert all(info.op not in copies for info in chain), [(i.name, i.op) for i in chain]


# --------------------------------------------------------------------------------------
# No silent nonsense: the YOLO case without a target, and bad targets
# --------------------------------------------------------------------------------------


def test_a_yolo_head_without_a_target_is_refused_and_its_detections_explained() -> None:
    case, _, x = detector("yolov8_tiny")
    undeclared = Explainer(export_detector(case))  # no task: the yolov8 head is recognised, not assumed explained
    task = undeclared.compiled().task
    assert task.detection.layout == "yolov8" and not task.declared
    with pytest.raises(InvalidInputError) as error:
        undeclared.explain(x)
    message = str(error.value)
    assert "output 'output0'" in message and "[1, 7, 84]" in message and "--target-detection" in message
    assert "yolov8 detection head" in message and [v.field for v in error.value.violations] == ["options.target"]
    assert undeclared.predict(x).classes == []  # not the argmax of box coordinates
    tree = undeclared.explain(x, target=DetectionTarget(0), top_k=2, depth=2)
    declared = detector("yolov8_tiny")[1].explain(x, top_k=2, depth=2)  # the declared task: its best detection
    assert nodes(tree) == nodes(declared) and tree.explained.kind == "detection" and tree.explained.detection == 0
    picture = np.full((64, 64, 3), 255, np.uint8)
    drawn = draw_target(picture, tree)
    x1, y1, x2, y2 = (int(round(v)) for v in tree.explained.box)
    red = np.all(drawn == OUTLINE, axis=-1)
    assert red[max(y1, 0):min(y2, 64), max(x1, 0)].any() and red[min(y2, 64) - 1, max(x1, 0):min(x2, 64)].any()
    assert not red[(y1 + y2) // 2, (x1 + x2) // 2]  # an outline, not a filled box
    assert "detection 0" in render_html(tree)


def test_the_region_outline_follows_the_mask() -> None:
    _, explainer, x = segmenter()
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    tree = explainer.explain(x, target=RegionTarget(0, mask=mask), top_k=1, depth=1)
    red = np.all(draw_target(np.zeros((64, 64, 3), np.uint8), tree) == OUTLINE, axis=-1)
    assert red[16:48, 16].any() and not red[32, 32] and not red[4, 4]


def _bad_cases() -> list[tuple[str, str, dict, str]]:
    seed = np.zeros((1, 3, 32, 32), np.float32)
    seed[0, 0, 0, 0] = 1
    return [
        ("yolov8_tiny", "detection index", {"target": DetectionTarget(99)}, "options.target.detection.index"),
        ("yolov8_tiny", "negative index", {"target": DetectionTarget(-1)}, "options.target.detection.index"),
        ("yolov8_tiny", "detection class", {"target": DetectionTarget(0, class_index=3)}, "options.target.detection.class_index"),
        ("yolov8_tiny", "class on a detector", {"target": 2}, "options.target.class_index"),
        ("yolov8_tiny", "region on boxes", {"target": RegionTarget(0)}, "options.output"),
        ("yolov8_tiny", "detection on an output", {"target": DetectionTarget(0), "output": "output0"}, "options.output"),
        ("yolov8_tiny", "element outside", {"target": ElementTarget((0, 7, 0))}, "options.target.element.index"),
        ("yolov8_tiny", "element rank", {"target": ElementTarget((0, 1))}, "options.target.element.index"),
        ("segmenter", "detection without a detector", {"target": DetectionTarget(0)}, "options.target.detection"),
        ("segmenter", "mask shape", {"target": RegionTarget(0, mask=np.ones((16, 16)))}, "options.target.region.mask"),
        ("segmenter", "mask rank", {"target": RegionTarget(0, mask=np.ones(32))}, "options.target.region.mask"),
        ("segmenter", "NaN mask", {"target": RegionTarget(0, mask=np.full((32, 32), np.nan))}, "options.target.region.mask"),
        ("segmenter", "region channel", {"target": RegionTarget(3)}, "options.target.region.channel"),
        ("segmenter", "box outside", {"target": RegionTarget(0, box=(40, 40, 50, 50))}, "options.target.region.box"),
        ("segmenter", "empty box", {"target": RegionTarget(0, box=(5, 5, 5, 9))}, "options.target.region.box"),
        ("segmenter", "seed shape", {"seed": np.ones((1, 3, 16, 16), np.float32)}, "options.seed"),
        ("segmenter", "NaN seed", {"seed": np.where(seed > 0, np.nan, seed)}, "options.seed"),
        ("segmenter", "zero seed", {"seed": np.zeros_like(seed)}, "options.seed"),
        ("segmenter", "seed and target", {"seed": seed, "target": 0}, "options.seed"),
        ("segmenter", "unknown output", {"seed": seed, "output": "nope"}, "options.output"),
        ("segmenter", "a target of no kind", {"target": "title"}, "options.target"),
    ]


@pytest.mark.parametrize(("model", "case", "options", "field"), _bad_cases(), ids=[c[1] for c in _bad_cases()])
def test_bad_targets_name_the_field(model: str, case: str, options: dict, field: str) -> None:
    explainer, x = (segmenter()[1:] if model == "segmenter" else detector(model)[1:])
    with pytest.raises(InvalidInputError) as error:
        explainer.explain(x, top_k=1, depth=1, **options)
    assert field in [v.field for v in error.value.violations], error.value.message


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def gap(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_detections_and_explains_one_with_its_box_drawn(capsys, tmp_path) -> None:
    code, out, _ = gap(capsys, "detections", "picodet_layout_cdla", str(EXAMPLES / "page.png"))
    assert code == 0 and out.startswith("10 detection(s)") and out.count("'title'") == 1
    title = next(line.split()[0] for line in out.splitlines() if "'title'" in line)
    html = tmp_path / "report.html"
    code, out, _ = gap(capsys, "explain", "picodet_layout_cdla", str(EXAMPLES / "page.png"), "--target-detection", title,
                       "--spread", "--top-k", "2", "--depth", "1", "--html", str(html), "--json", str(tmp_path / "t.json"))
    assert code == 0 and f"detection {title} 'title' (class 1) at [" in out
    assert f"detection {title} &#39;title&#39; (class 1)" in html.read_text()
    saved = json.loads((tmp_path / "t.json").read_text())["explained"]
    assert saved["kind"] == "detection" and saved["detection"] == int(title) and len(saved["box"]) == 4
    code, out, _ = gap(capsys, "explain", "picodet_layout_cdla", str(EXAMPLES / "page.png"), "--top-k", "1", "--depth", "1",
                       "--target-element", "transpose_4.tmp_0[0,100,1]")
    assert code == 0 and "element 'transpose_4.tmp_0'[0, 100, 1]" in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--spread"], "--spread: goes with --target-detection"),
    (["--region-box", "1,2,3,4"], "--region-box: goes with --target-region"),
    (["--target-element", "transpose_0.tmp_0[0,1"], "--target-element: 'transpose_0.tmp_0[0,1' is not OUTPUT[i,j,...]"),
    (["--target-detection", "99"], "options.target.detection.index: 99 is out of range: the model found 10 detection(s)"),
    (["--target", "3"], "options.target.class_index: output 'transpose_0.tmp_0' has shape [1, 7600, 10], not a class vector"),
    (["--seed", "missing.npy"], "--seed: cannot read missing.npy"),
])
def test_cli_bad_targets_are_one_clear_line(capsys, flags: list[str], message: str) -> None:
    code, _, err = gap(capsys, "explain", "picodet_layout_cdla", str(EXAMPLES / "page.png"), "--depth", "1", *flags)
    assert code == 2 and message in err and "Traceback" not in err
