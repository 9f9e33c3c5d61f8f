"""Bad models and bad requests to the rewriter get clear errors that name the problem."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from gap_service import Explainer
from gap_service.errors import (InvalidInputError, InvalidModelError, NotConnectedError, UnknownTensorError,
                                UnsupportedOpError)
from support.models import export_onnx, sample_input, torch_case


def model_from(text: str, shape=(1, 3, 8, 8), constants=None) -> onnx.ModelProto:
    graph = onnx.parser.parse_graph(f"g (float{list(shape)} x) => (float y) {{ {text} }}")
    for name, value in (constants or {}).items():
        graph.initializer.append(onnx.numpy_helper.from_array(value, name=name))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)


def test_every_unsupported_op_is_listed_by_type_and_node() -> None:
    model = model_from("a = Conv (x, w)\nb = Sin (a)\nc = Relu (b)\nd = Cos (c)\ny = GlobalAveragePool (d)", constants={"w": W})
    for i, node in enumerate(model.graph.node):
        node.name = f"node{i}"
    explainer = Explainer(model)
    with pytest.raises(UnsupportedOpError) as info:
        explainer.vjp(np.zeros((1, 3, 8, 8), np.float32), "y", "a", np.ones((1, 1, 4, 1, 1), np.float32))
    message = str(info.value)
    assert "Sin (node 'node1')" in message and "Cos (node 'node3')" in message
    assert info.value.ops == [("Sin", "node1"), ("Cos", "node3")]


def test_unsupported_op_off_the_path_is_fine() -> None:
    model = model_from("a = Conv (x, w)\nb = Relu (a)\ny = GlobalAveragePool (b)\nz = Sin (x)", constants={"w": W})
    model.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    explainer = Explainer(model)
    grads = explainer.vjp(np.ones((1, 3, 8, 8), np.float32), "y", "a", np.ones((2, 1, 4, 1, 1), np.float32))
    assert grads.shape == (2, 1, 4, 6, 6)


def test_non_cnn_graph_is_refused_with_a_reason() -> None:
    model = model_from("h = Gemm <transB=1> (x, w)\ny = Relu (h)", shape=(1, 8),
                       constants={"w": np.ones((4, 8), np.float32)})
    with pytest.raises(InvalidModelError, match="does not look like a CNN"):
        Explainer(model).layers()


def test_unknown_tensor_names() -> None:
    case = torch_case("vgg")
    explainer = Explainer(export_onnx(case, 17))
    x = sample_input(case)
    top = explainer.layers()[0]
    with pytest.raises(UnknownTensorError, match="'nope'"):
        explainer.vjp(x, "nope", top, np.ones((1, 1, 10), np.float32))
    with pytest.raises(UnknownTensorError, match="'nope'"):
        explainer.vjp(x, explainer.decision().logits, "nope", np.ones((1, 1, 10), np.float32))


def test_lower_that_does_not_feed_upper() -> None:
    case = torch_case("vgg")
    explainer = Explainer(export_onnx(case, 17))
    x = sample_input(case)
    top, below = explainer.layers()[:2]
    shape = explainer.compiled().shape(below)
    with pytest.raises(NotConnectedError, match="does not feed"):
        explainer.vjp(x, below, top, np.ones((1, *shape), np.float32))


@pytest.mark.parametrize("seeds_shape", [(1, 10), (2, 1, 11), (0, 1, 10), (1, 1, 1, 10)])
def test_bad_seed_shapes_name_the_expected_shape(seeds_shape) -> None:
    case = torch_case("vgg")
    explainer = Explainer(export_onnx(case, 17))
    with pytest.raises(InvalidInputError, match="seeds"):
        explainer.vjp(sample_input(case), explainer.decision().logits, explainer.layers()[0], np.ones(seeds_shape, np.float32))


@pytest.mark.parametrize(
    "inputs, needle",
    [(np.full((1, 3, 64, 64), np.nan, np.float32), "NaN"),
     (np.zeros((2, 3, 64, 64), np.float32), "batch size 2"),
     (np.zeros((1, 3, 64), np.float32), "rank"),
     (np.zeros((1, 3, 64, 64), np.complex64), "dtype"),
     ({"other": np.zeros((1, 3, 64, 64), np.float32)}, "unknown input")],
)
def test_bad_inputs(inputs, needle) -> None:
    case = torch_case("vgg")
    explainer = Explainer(export_onnx(case, 17))
    with pytest.raises(InvalidInputError, match=needle):
        explainer.explain(inputs)


def test_not_an_onnx_file(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(InvalidModelError, match="not a readable ONNX model"):
        Explainer(path)
    with pytest.raises(InvalidModelError, match="not found"):
        Explainer(tmp_path / "missing.onnx")


def test_dynamic_dims_need_a_shape() -> None:
    from support.models import PADDLE_MODELS

    with pytest.raises(InvalidInputError, match="dynamic dims"):
        Explainer(PADDLE_MODELS["ppocr_cls"]).layers()
