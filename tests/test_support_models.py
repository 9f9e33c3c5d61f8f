"""Checks of the test-suite's model zoo (tests/support/models.py).

Every torch case must export (opsets 11 and 17) to a valid, static ONNX graph that
onnxruntime evaluates exactly like torch and that contains the ops the case exists to
exercise; the zoo graphs must get well-scaled random weights; the PaddleOCR graphs must run.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

try:
    from tests.support import models
except ImportError:  # tests/ itself on sys.path (pytest rootdir-less "prepend" import mode)
    from support import models  # type: ignore[no-redef]

PADDLE_MODELS = models.PADDLE_MODELS
TORCH_CASES = models.TORCH_CASES
ZOO_MODELS = models.ZOO_MODELS
TorchCase = models.TorchCase
export_onnx = models.export_onnx
output_name = models.output_name
paddle_input = models.paddle_input
sample_input = models.sample_input
torch_case = models.torch_case
zoo_data_input = models.zoo_data_input
zoo_input = models.zoo_input
zoo_logits_name = models.zoo_logits_name
zoo_model = models.zoo_model

OPSETS = (11, 17)
SLOW_CASES = {"resnet50"}


def _case_params() -> list[object]:
    """``(name, opset)`` for every torch case and opset; ResNet-50 is marked slow."""
    return [
        pytest.param(
            name,
            opset,
            id=f"{name}-opset{opset}",
            marks=[pytest.mark.slow] if name in SLOW_CASES else [],
        )
        for name in TORCH_CASES
        for opset in OPSETS
    ]


@functools.lru_cache(maxsize=None)
def _case(name: str) -> TorchCase:
    """One instance per case for the whole module (building ResNet-50 takes a moment)."""
    return torch_case(name)


@functools.lru_cache(maxsize=None)
def _onnx(name: str, opset: int) -> onnx.ModelProto:
    return onnx.load_from_string(export_onnx(_case(name), opset))


def _session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in _nodes(model, "Constant"):
        values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


# --------------------------------------------------------------------------------------
# Torch cases
# --------------------------------------------------------------------------------------

# Ops each case exists to exercise (checked at both opsets).
EXPECTED_OPS: dict[str, set[str]] = {
    "vgg": {"Conv", "Relu", "MaxPool", "Flatten", "Gemm"},
    "resnet_bn": {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Gemm"},
    "resnet_fused": {"Conv", "Relu", "Add", "GlobalAveragePool", "Gemm"},
    "resnet_bn_decomposed": {"Conv", "Sub", "Mul", "Add", "Relu", "Gemm"},
    "mobilenetv2": {"Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool"},
    "mobilenetv3": {"Conv", "BatchNormalization", "HardSigmoid", "Mul", "Relu", "Add"},
    "densenet": {"Conv", "BatchNormalization", "Relu", "Concat", "AveragePool"},
    "efficientnet": {"Conv", "BatchNormalization", "Sigmoid", "Mul", "GlobalAveragePool", "Add"},
    "nhwc": {"Transpose", "Conv", "Relu", "Add", "ReduceMean", "Gemm"},
    "softmax_head": {"Conv", "MaxPool", "Gemm", "Softmax"},
    "misc_ops_a": {
        "LeakyRelu", "PRelu", "Elu", "Selu", "Tanh", "Softplus", "Sigmoid",
        "Pad", "MaxPool", "AveragePool", "Conv", "Flatten", "Gemm",
    },
    "misc_ops_b": {
        "ConvTranspose", "Resize", "Split", "Slice", "Pow", "Sqrt", "Div", "ReduceMean",
        "ReduceSum", "Sub", "LRN", "Reshape", "Transpose", "Concat", "Pad", "Flatten", "Gemm",
    },
    "resnet18": {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Gemm"},
    "resnet50": {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Gemm"},
}  # fmt: skip

# No case may contain dynamic-shape machinery or control flow.
FORBIDDEN_EVERYWHERE = {"Shape", "ConstantOfShape", "If", "Loop", "Dropout"}
FORBIDDEN_OPS: dict[str, set[str]] = {
    "resnet_fused": {"BatchNormalization"},
    "resnet_bn_decomposed": {"BatchNormalization"},
    "nhwc": {"BatchNormalization"},
}


def test_every_case_has_expectations() -> None:
    assert set(EXPECTED_OPS) == set(TORCH_CASES)


@pytest.mark.parametrize(("name", "opset"), _case_params())
def test_export_is_valid_and_matches_torch(name: str, opset: int) -> None:
    case = _case(name)
    model = _onnx(name, opset)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]

    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    assert tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim) == case.input_shape
    (graph_output,) = model.graph.output
    assert graph_output.name == output_name(case)
    assert all(d.HasField("dim_value") for d in graph_output.type.tensor_type.shape.dim)

    x = sample_input(case, seed=1)
    with torch.no_grad():
        expected = case.module(torch.from_numpy(x)).numpy()
    (actual,) = _session(model).run(None, {"input": x})
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)
    assert np.std(expected) > 0


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CASES else []) for n in TORCH_CASES],
)
def test_input_gradients_are_informative(name: str) -> None:
    """Every input pixel influences the top logit: no dead units, no saturated heads."""
    case = _case(name)
    x = torch.from_numpy(sample_input(case)).requires_grad_(True)
    output = case.module(x)
    output[0, int(output.argmax())].backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert float((x.grad != 0).float().mean()) > 0.99
    assert float(x.grad.abs().mean()) > 1e-5


@pytest.mark.parametrize(("name", "opset"), _case_params())
def test_expected_op_types(name: str, opset: int) -> None:
    ops = Counter(node.op_type for node in _onnx(name, opset).graph.node)
    missing = EXPECTED_OPS[name] - set(ops)
    assert not missing, f"{name} lacks {missing}; has {dict(ops)}"
    forbidden = (FORBIDDEN_EVERYWHERE | FORBIDDEN_OPS.get(name, set())) & set(ops)
    assert not forbidden, f"{name} unexpectedly contains {forbidden}"


@pytest.mark.parametrize("opset", OPSETS)
def test_resnet_bn_encodings(opset: int) -> None:
    bn = Counter(n.op_type for n in _onnx("resnet_bn", opset).graph.node)
    fused = Counter(n.op_type for n in _onnx("resnet_fused", opset).graph.node)
    decomposed = Counter(n.op_type for n in _onnx("resnet_bn_decomposed", opset).graph.node)
    assert bn["BatchNormalization"] == bn["Conv"] == fused["Conv"] == decomposed["Conv"]
    assert fused["BatchNormalization"] == decomposed["BatchNormalization"] == 0
    assert decomposed["Sub"] == bn["BatchNormalization"]
    # The 1x1 stride-2 projection shortcuts.
    convs = [_attributes(n) for n in _nodes(_onnx("resnet_bn", opset), "Conv")]
    assert any(a["kernel_shape"] == [1, 1] and a["strides"] == [2, 2] for a in convs)
    # The three encodings compute the same function.
    x = torch.from_numpy(sample_input(_case("resnet_bn")))
    with torch.no_grad():
        reference = _case("resnet_bn").module(x)
        for other in ("resnet_fused", "resnet_bn_decomposed"):
            torch.testing.assert_close(_case(other).module(x), reference, rtol=1e-4, atol=1e-4)


def _is_depthwise(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    weight = _constants(model)[node.input[1]]
    group = int(_attributes(node).get("group", 1))  # type: ignore[call-overload]
    return group > 1 and weight.shape[1] == 1 and group == weight.shape[0]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", ["mobilenetv2", "mobilenetv3", "efficientnet"])
def test_depthwise_convs(name: str, opset: int) -> None:
    model = _onnx(name, opset)
    depthwise = [n for n in _nodes(model, "Conv") if _is_depthwise(model, n)]
    assert depthwise
    assert any(_attributes(n)["strides"] == [2, 2] for n in depthwise)


@pytest.mark.parametrize("opset", OPSETS)
def test_mobilenetv2_relu6_is_clip(opset: int) -> None:
    model = _onnx("mobilenetv2", opset)
    constants = _constants(model)
    clips = _nodes(model, "Clip")
    assert clips
    for clip in clips:  # from opset 11 on, min and max are inputs
        assert float(constants[clip.input[1]]) == 0.0
        assert float(constants[clip.input[2]]) == 6.0


@pytest.mark.parametrize("opset", OPSETS)
def test_mobilenetv3_activations_and_se(opset: int) -> None:
    model = _onnx("mobilenetv3", opset)
    ops = Counter(n.op_type for n in model.graph.node)
    if opset >= 14:  # HardSwish exists from opset 14; before that it is HardSigmoid * x
        assert ops["HardSwish"] > 0
    # Squeeze-excitation: GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul.
    producer = {out: node for node in model.graph.node for out in node.output}
    se_gates = 0
    for mul in _nodes(model, "Mul"):
        chain = [producer.get(name) for name in mul.input]
        gate = next((n for n in chain if n is not None and n.op_type == "HardSigmoid"), None)
        if gate is None:
            continue
        path = []
        node: onnx.NodeProto | None = gate
        for _ in range(4):
            node = producer.get(node.input[0]) if node is not None else None
            path.append(node.op_type if node is not None else None)
        if path == ["Conv", "Relu", "Conv", "GlobalAveragePool"]:
            se_gates += 1
    assert se_gates == 2


@pytest.mark.parametrize("opset", OPSETS)
def test_efficientnet_silu(opset: int) -> None:
    model = _onnx("efficientnet", opset)
    producer = {out: node for node in model.graph.node for out in node.output}
    silu = [
        mul
        for mul in _nodes(model, "Mul")
        if any(
            (p := producer.get(name)) is not None
            and p.op_type == "Sigmoid"
            and p.input[0] in mul.input
            for name in mul.input
        )
    ]
    assert len(silu) >= 5


@pytest.mark.parametrize("opset", OPSETS)
def test_nhwc_layout(opset: int) -> None:
    model = _onnx("nhwc", opset)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert shape[-1] == 3 and shape[1] == shape[2]
    perms = [_attributes(n)["perm"] for n in _nodes(model, "Transpose")]
    assert perms.count([0, 3, 1, 2]) == 3 and perms.count([0, 2, 3, 1]) == 3
    # The first op touching the input is the NHWC->NCHW transpose.
    assert model.graph.node[0].op_type == "Transpose"
    (reduce,) = _nodes(model, "ReduceMean")
    assert _attributes(reduce)["axes"] == [1, 2]


@pytest.mark.parametrize("opset", OPSETS)
def test_softmax_head_ends_in_softmax(opset: int) -> None:
    model = _onnx("softmax_head", opset)
    last = model.graph.node[-1]
    assert last.op_type == "Softmax" and last.output[0] == "probs"
    x = sample_input(_case("softmax_head"))
    (probs,) = _session(model).run(None, {"input": x})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
def test_misc_ops_a_attributes(opset: int) -> None:
    model = _onnx("misc_ops_a", opset)
    pad_modes = {_attributes(n).get("mode", b"constant") for n in _nodes(model, "Pad")}
    assert pad_modes == {b"reflect", b"edge"}
    convs = [_attributes(n) for n in _nodes(model, "Conv")]
    assert any(a.get("dilations") == [2, 2] for a in convs)
    assert any(a.get("group") == 2 for a in convs)
    (maxpool,) = [_attributes(n) for n in _nodes(model, "MaxPool")]
    assert maxpool["ceil_mode"] == 1 and any(maxpool["pads"])  # type: ignore[arg-type]
    (avgpool,) = [_attributes(n) for n in _nodes(model, "AveragePool")]
    assert avgpool["ceil_mode"] == 1 and avgpool.get("count_include_pad", 0) == 0
    assert any(avgpool["pads"])  # type: ignore[arg-type]


@pytest.mark.parametrize("opset", OPSETS)
def test_misc_ops_b_attributes(opset: int) -> None:
    model = _onnx("misc_ops_b", opset)
    (transpose_conv,) = [_attributes(n) for n in _nodes(model, "ConvTranspose")]
    assert transpose_conv["strides"] == [2, 2] and transpose_conv["output_padding"] == [1, 1]
    resizes = [_attributes(n) for n in _nodes(model, "Resize")]
    assert {r["mode"] for r in resizes} == {b"nearest", b"linear"}
    modes = {r.get("coordinate_transformation_mode") for r in resizes if r["mode"] == b"linear"}
    assert b"align_corners" in modes and len(modes) == 2
    (lrn,) = [_attributes(n) for n in _nodes(model, "LRN")]
    assert lrn["size"] == 3
    (pad,) = _nodes(model, "Pad")
    assert _attributes(pad).get("mode", b"constant") == b"constant"
    assert len(_nodes(model, "Split")) == 2
    # Channel shuffle: reshape to 5-D, swap the two channel axes, reshape back.
    assert [0, 2, 1, 3, 4] in [_attributes(n)["perm"] for n in _nodes(model, "Transpose")]


def test_densenet_concatenates_features() -> None:
    model = _onnx("densenet", 17)
    concats = _nodes(model, "Concat")
    assert len(concats) == 6 and all(_attributes(n)["axis"] == 1 for n in concats)


@pytest.mark.parametrize(
    ("name", "blocks"),
    [("resnet18", 8), pytest.param("resnet50", 16, marks=pytest.mark.slow)],
)
def test_imagenet_resnets(name: str, blocks: int) -> None:
    case = _case(name)
    assert case.input_shape == (1, 3, 224, 224)
    model = _onnx(name, 17)
    assert Counter(n.op_type for n in model.graph.node)["Add"] == blocks
    stem = _attributes(_nodes(model, "Conv")[0])
    assert stem["kernel_shape"] == [7, 7] and stem["strides"] == [2, 2]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1000
    params = sum(p.numel() for p in case.module.parameters())
    expected = {"resnet18": 11_689_512, "resnet50": 25_557_032}[name]  # torchvision's counts
    assert params == expected


def test_cases_are_deterministic_and_leave_global_rng_alone() -> None:
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    first, second = torch_case("mobilenetv3"), torch_case("mobilenetv3")
    after = torch.rand(3)
    torch.testing.assert_close(before, after)
    for (k1, v1), (k2, v2) in zip(
        first.module.state_dict().items(), second.module.state_dict().items(), strict=True
    ):
        assert k1 == k2
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    assert not first.module.training
    bn = next(m for m in first.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_var is not None and bn.running_mean is not None
    assert 0.5 <= float(bn.running_var.min()) and float(bn.running_var.max()) <= 1.5
    assert float(bn.running_mean.abs().max()) > 0


def test_export_is_cached_and_inputs_are_seeded() -> None:
    case = _case("vgg")
    assert export_onnx(case, 17) is export_onnx(torch_case("vgg"), 17)
    assert export_onnx(case, 11) is not export_onnx(case, 17)
    x = sample_input(case)
    assert x.dtype == np.float32 and x.shape == case.input_shape
    np.testing.assert_array_equal(x, sample_input(case, seed=0))
    assert not np.array_equal(x, sample_input(case, seed=1))
    with pytest.raises(KeyError):
        torch_case("no_such_case")


# --------------------------------------------------------------------------------------
# ONNX model-zoo graphs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model(name: str) -> None:
    original = onnx.load(str(models._ZOO_DIR / f"light_{name}.onnx"))
    model = zoo_model(name)
    # Same nodes, same names, same tensor names; only the weight producers changed.
    assert [n.name for n in model.graph.node] == [n.name for n in original.graph.node]
    assert [list(n.output) for n in model.graph.node] == [
        list(n.output) for n in original.graph.node
    ]
    assert [i.name for i in model.graph.initializer] == [i.name for i in original.graph.initializer]
    assert not _nodes(model, "ConstantOfShape")
    assert len(_nodes(model, "Constant")) == len(_nodes(original, "ConstantOfShape"))

    feeds = zoo_input(name)
    (data_name,) = feeds
    assert data_name == zoo_data_input(model).name
    assert feeds[data_name].shape == (1, 3, 224, 224)

    logits_name = zoo_logits_name(model)
    if logits_name not in {o.name for o in model.graph.output}:
        # Expose the logits too; the weight-free original gives their inferred type cheaply.
        inferred = onnx.shape_inference.infer_shapes(original).graph.value_info
        model.graph.output.append(next(v for v in inferred if v.name == logits_name))
    data = model.SerializeToString()  # once: VGG-19 carries 0.5 GB of weights
    del model
    onnx.checker.check_model(data)
    outputs = _session(data).run(None, feeds)
    logits = outputs[-1].reshape(-1)
    assert logits.size == 1000
    assert np.isfinite(logits).all()
    assert 0.1 < float(np.std(logits)) < 1e3, f"logit std {np.std(logits)}"
    assert all(np.isfinite(o).all() for o in outputs)


def test_zoo_model_is_seeded() -> None:
    def weights(model: onnx.ModelProto) -> list[np.ndarray]:
        return [numpy_helper.to_array(n.attribute[0].t) for n in _nodes(model, "Constant")]

    a, b, c = zoo_model("squeezenet"), zoo_model("squeezenet"), zoo_model("squeezenet", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(weights(a), weights(b), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(weights(a), weights(c), strict=True))
    with pytest.raises(KeyError):
        zoo_model("no_such_model")


def test_zoo_batchnorm_statistics_are_calibrated() -> None:
    model = zoo_model("resnet50")
    constants = _constants(model)
    for bn in _nodes(model, "BatchNormalization"):
        variance = constants[bn.input[4]]
        scale = constants[bn.input[1]]
        assert (variance > 0).all()
        assert 0.5 <= scale.min() and scale.max() <= 1.5


# --------------------------------------------------------------------------------------
# PaddleOCR graphs
# --------------------------------------------------------------------------------------

PADDLE_SHAPES = {
    "ppocr_cls": (1, 3, 48, 192),
    "ppocr_det": (1, 3, 64, 64),
    "ppocr_rec": (1, 3, 48, 160),
}


@pytest.mark.parametrize("name", sorted(PADDLE_MODELS))
def test_paddle_model_runs(name: str) -> None:
    path = PADDLE_MODELS[name]
    assert path.is_file(), path
    x = paddle_input(name)
    assert x.dtype == np.float32 and x.shape == PADDLE_SHAPES[name]
    assert -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x, paddle_input(name, seed=0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    assert outputs and all(np.isfinite(o).all() for o in outputs)
    if name == "ppocr_det":
        assert outputs[0].shape == (1, 1, 64, 64)
    if name == "ppocr_cls":
        np.testing.assert_allclose(outputs[0].sum(axis=-1), 1.0, rtol=1e-5)
