"""Gradients on third-party graphs: the nine ONNX model-zoo CNNs (seeded random weights) and the
PaddlePaddle models inside rapidocr-onnxruntime, against torch autograd on the same graphs."""

from __future__ import annotations

import pytest

from gap_service import Explainer
from gradcheck import LARGE_GRAPH_TOLERANCE, check_chain
from support.models import PADDLE_INPUT_SHAPES, PADDLE_MODELS, ZOO_MODELS, paddle_input, zoo_input, zoo_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_model_zoo_graph(name: str) -> None:
    model = zoo_model(name)
    inputs = zoo_input(name)
    results = check_chain(Explainer(model), None, inputs, sizes=(1, 7), tolerance=LARGE_GRAPH_TOLERANCE)
    assert len(results) >= 2 * 3


@pytest.mark.parametrize("name", sorted(PADDLE_MODELS))
def test_paddle_model(name: str) -> None:
    explainer = Explainer(PADDLE_MODELS[name], input_shapes=PADDLE_INPUT_SHAPES[name])
    x = paddle_input(name)
    results = check_chain(explainer, None, {explainer.inputs[0].name: x}, sizes=(1, 7), tolerance=LARGE_GRAPH_TOLERANCE)
    assert len(results) >= 2 * 3
