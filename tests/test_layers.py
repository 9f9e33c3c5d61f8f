"""Default layers are real feature maps, never copies (Pad, Slice, reshapes, transposes...):
where a Pad feeds a strided conv, the layer is the Pad's input (issue 10, item 2)."""

from __future__ import annotations

import onnx
import pytest

from gap_service import Explainer
from gap_service.graph.rules import Layout, entry
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gradcheck import check_chain
from support.models import export_onnx, sample_input, torch_case
from support.torch_oracle import TorchGraph


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
