"""Default layers are real feature maps, never copies (Pad, Slice, reshapes, transposes...):
where a Pad feeds a strided conv, the layer is the Pad's input (issue 10, item 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from gap_service import Explainer
from gap_service.graph.rules import Layout, entry
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gradcheck import check_chain
from support.models import export_onnx, sample_input, torch_case
from support.torch_oracle import TorchGraph

DATA = Path(__file__).parent / "data"


def _is_copy(op: str) -> bool:
    return bool(entry(op).layout & (Layout.COPY | Layout.POOLING))


@pytest.mark.parametrize("opset", [11, 17])
def test_explicit_pads_before_strided_convs_are_not_layers(opset: int) -> None:
    case = torch_case("padded_strides")
    data = export_onnx(case, opset)
    model = onnx.load_from_string(data)
    pads = [node for node in model.graph.node if node.op_type == "Pad"]
    assert len(pads) == 3  # ZeroPad2d twice, F.pad once
    explainer = Explainer(data)
    infos = explainer.layer_infos()
    assert [info.spatial_shape for info in infos] == [(8, 8), (16, 16), (32, 32)]
    assert not any(_is_copy(info.op) for info in infos)
    padded = {node.input[0] for node in pads}
    assert infos[1].name in padded and infos[2].name in padded  # the Pads' inputs
    assert infos[1].reason == f"the last 16x16 map feeding '{infos[0].name}'"
    results = check_chain(explainer, TorchGraph(model), {"input": sample_input(case)}, sizes=(1, 5))
    assert len(results) == 3 * 2


@pytest.mark.parametrize("name", sorted(load_repository(BUNDLED_REPOSITORY)))
def test_no_default_layer_of_a_bundled_model_is_a_copy(name: str) -> None:
    infos = load_repository(BUNDLED_REPOSITORY)[name].explainer().layer_infos()
    assert infos and not any(_is_copy(info.op) for info in infos), [(info.name, info.op) for info in infos]


# tf2onnx exports of Keras MobileNetV2/EfficientNet-style blocks (scripts/export_keras_padded.py):
# ZeroPadding2D(correct_pad) -> 'valid' stride-2 DepthwiseConv2D stays an explicit Pad. By default
# tf2onnx pushes the NHWC Transposes out to the input (an NCHW graph inside: channel axis 1);
# the "_nhwc" file skips that pass, so every conv is Transpose-wrapped and the maps are NHWC.
KERAS_MODELS = [("keras_padded", 1, 1), ("keras_padded_nhwc", 3, 32)]  # file, channel axis, Transposes


def _keras(name: str) -> tuple[onnx.ModelProto, Explainer]:
    path = DATA / f"{name}.onnx"
    return onnx.load(path), Explainer(path)


def _keras_input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 64, 64, 3)).astype(np.float32)


def _consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if tensor in node.input]


def _strided_conv_after(model: onnx.ModelProto, pad: onnx.NodeProto) -> onnx.NodeProto:
    """The conv a Pad feeds, through the NHWC->NCHW Transpose where tf2onnx left one."""
    (node,) = _consumers(model, pad.output[0])
    if node.op_type == "Transpose":
        (node,) = _consumers(model, node.output[0])
    return node


@pytest.mark.parametrize("name, axis, transposes", KERAS_MODELS)
def test_tf2onnx_pads_before_strided_depthwise_convs_are_not_layers(name: str, axis: int, transposes: int) -> None:
    model, explainer = _keras(name)
    assert [node.input[0] for node in model.graph.node if node.op_type == "Transpose"][0] == "input"
    assert sum(node.op_type == "Transpose" for node in model.graph.node) == transposes
    pads = [node for node in model.graph.node if node.op_type == "Pad"]
    assert len(pads) == 2  # one ZeroPadding2D per strided depthwise conv; 'same' stride-2 Conv2Ds fold theirs
    for pad in pads:
        conv = _strided_conv_after(model, pad)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        assert conv.op_type == "Conv" and attrs["strides"] == [2, 2] and attrs["group"] > 1, conv
    infos = explainer.layer_infos()
    assert not any(_is_copy(info.op) for info in infos), [(info.name, info.op) for info in infos]
    assert [info.spatial_shape for info in infos] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert [info.channels for info in infos] == [32, 16, 48, 32]
    assert all(info.channel_axis == axis for info in infos)
    # The maps below each Pad -> strided depthwise conv are the Pads' inputs (the swish and the
    # ReLU6 of the expansion convs), not the padded 17x17/33x33 copies.
    assert [infos[2].name, infos[3].name] == [pads[1].input[0], pads[0].input[0]]
    assert [infos[2].op, infos[3].op] == ["Mul", "Clip"]
    assert infos[3].reason == f"the last 32x32 map feeding '{infos[2].name}'"
    check_chain(explainer, TorchGraph(model), {"input": _keras_input(0)}, sizes=(1, 4))


@pytest.mark.parametrize("name, axis, transposes", KERAS_MODELS)
def test_tf2onnx_padded_model_gradients_match_finite_differences(name: str, axis: int, transposes: int) -> None:
    """Torch-free: explain(top_k=2, depth=2) runs and its level-1 scores are <G, A> per channel for
    G = vjp(one-hot logit -> l_1); the VJPs of the smooth pairs down to 16x16 (the last through
    a Pad, a strided depthwise conv and squeeze-and-excite) match central differences of the
    pair's forward segment fed perturbed activations. The 16x16 <- 32x32 pair crosses ReLU6
    kinks (seen: 1-6% off at any step), so only the torch check above covers it."""
    _, explainer = _keras(name)
    x = _keras_input(1)
    explanation = explainer.explain(x, top_k=2, depth=2)
    assert explanation.depth == 2 and len(explanation.level(1)) == 2
    compiled = explainer.compiled()
    chain = [compiled.decision.logits, *(info.name for info in explainer.layer_infos())]
    assert explanation.layers == chain[1:3]
    state = explainer.forward(x, chain)
    seed = np.zeros((1, *state[chain[0]].shape), np.float32)
    seed[0, 0, explanation.target] = 1.0
    gradient = explainer.vjp(x, chain[0], chain[1], seed)[0]
    scores = np.moveaxis(gradient * state[chain[1]], axis, 1)[0].sum(axis=(1, 2))
    for node in explanation.level(1):
        assert node.score == pytest.approx(float(scores[node.channel]), rel=1e-4)
    rng = np.random.default_rng(2)
    step = 1e-2  # of the activations' mean magnitude: seen at most 1.2e-3 off; at 1e-3 float32 rounding alone gives 1e-2
    for upper, lower in zip(chain[:-2], chain[1:-1]):
        pair_state = compiled.forward({"input": x}, compiled.state_names(upper, lower))
        seeds = rng.standard_normal((3, *state[upper].shape)).astype(np.float32)
        for s, grad in zip(seeds, explainer.vjp(x, upper, lower, seeds)):
            direction = rng.standard_normal(grad.shape).astype(np.float32)
            direction *= np.abs(state[lower]).mean() / np.abs(direction).mean()

            def objective(sign: float) -> float:
                moved = (state[lower] + sign * step * direction).astype(np.float32)
                return float((s.astype(np.float64) * compiled.run_segment(upper, lower, {**pair_state, lower: moved})).sum())

            difference = (objective(1) - objective(-1)) / (2 * step)
            assert float((grad.astype(np.float64) * direction).sum()) == pytest.approx(difference, rel=5e-3), (upper, lower)
