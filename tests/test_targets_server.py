"""Targets over gRPC, on a real server with the bundled PP-PicoDet detector: GetModel states the
task, Predict returns its detections, Explain/ExplainStream/Expand take a Target and give the
library's trees; bad targets are INVALID_ARGUMENT with a field violation naming the field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from PIL import Image

from gap_service.cli import main
from gap_service.client import GapClient, bad_request
from gap_service.options import DetectionTarget, ExplainOptions
from gap_service.preprocess import preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.server.process import ServerProcess
from gap_service.wire import messages, pb
from gap_service.wire.tensors import to_tensor

pytestmark = pytest.mark.timeout(240)

MODEL = "picodet_layout_cdla"
PAGE = BUNDLED_REPOSITORY.parent / "examples" / "page.png"
S, E = pb.service, pb.explanation


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", MODEL]) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with GapClient(server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def local():
    entry = load_repository(BUNDLED_REPOSITORY)[MODEL]
    x, _ = preprocess(Image.open(PAGE).convert("RGB"), entry.config.preprocessing)
    return entry.explainer(), x


def test_get_model_states_the_task_and_predict_returns_the_detections(client, local) -> None:
    task = client.get_model(MODEL).task
    assert (task.kind, task.declared, task.layout) == ("detection", True, "boxes_scores") and len(task.outputs) == 8
    explainer, x = local
    remote = client.predict(MODEL, tensor=x)
    assert remote.classes == [] and remote.detections == explainer.predict(x).detections
    assert [d.label for d in remote.detections].count("title") == 1 and len(remote.detections) == 10


def test_explain_with_a_detection_target_equals_the_library(client, local) -> None:
    explainer, x = local
    target = DetectionTarget(4, spread=True)
    remote = client.explain(MODEL, tensor=x, target=target, top_k=2, depth=2)
    mine = explainer.explain(x, target=target, top_k=2, depth=2)
    assert [(n.layer, n.channel, n.score) for n in remote.nodes] == [(n.layer, n.channel, n.score) for n in mine.nodes]
    assert remote.explained.box == mine.explained.box and remote.label == "title" and remote.explained.detection == 4
    streamed = list(client.explain_stream(MODEL, tensor=x, target=target, top_k=2, depth=1))[-1].explanation
    assert streamed.explained.outputs == mine.explained.outputs
    channel = mine.nodes[1].channel
    expanded = client.expand(MODEL, [channel], tensor=x, target=target, top_k=2, depth=1).explanation
    assert [n.channel for n in expanded.nodes[1:]] == [mine.nodes[c].channel for c in mine.nodes[1].children]


def _request(**options) -> S.ExplainRequest:
    x = np.zeros((1, 3, 800, 608), np.float32)
    message = S.ExplainRequest(model=MODEL, input=S.Input(tensor=to_tensor(x)),
                               options=messages.options_to_proto(ExplainOptions(top_k=1, depth=1)))
    for name, value in options.items():
        getattr(message.options, name).CopyFrom(value) if hasattr(value, "DESCRIPTOR") else setattr(message.options, name, value)
    return message


SCORES = (1, 7600, 10)
BAD = {
    "detection index": (_request(target=E.Target(detection=E.DetectionTarget(index=99))), "options.target.detection.index"),
    "negative index": (_request(target=E.Target(detection=E.DetectionTarget(index=-2))), "options.target.detection.index"),
    "detection class": (_request(target=E.Target(detection=E.DetectionTarget(index=0, class_index=10))),
                        "options.target.detection.class_index"),
    "no kind": (_request(target=E.Target()), "options.target"),
    "class on a detector": (_request(target=E.Target(class_index=1)), "options.target.class_index"),
    "region on scores": (_request(target=E.Target(region=E.RegionTarget(channel=0))), "options.output"),
    "region box": (_request(target=E.Target(region=E.RegionTarget(channel=0, box=[1, 2, 3]))), "options.target.region.box"),
    "region mask": (_request(target=E.Target(region=E.RegionTarget(channel=0, mask=to_tensor(np.ones(3))))),
                    "options.target.region.mask"),
    "element": (_request(target=E.Target(element=E.ElementTarget(index=[0, 7600, 0]))), "options.target.element.index"),
    "seed shape": (_request(seed=to_tensor(np.ones((1, 10), np.float32))), "options.seed"),
    "NaN seed": (_request(seed=to_tensor(np.full(SCORES, np.nan, np.float32))), "options.seed"),
    "seed bytes": (_request(seed=pb.tensor.Tensor(dtype=1, shape=list(SCORES), data=b"\0" * 8)), "options.seed.data"),
    "unknown output": (_request(output="nope", seed=to_tensor(np.ones(SCORES, np.float32))), "options.output"),
    "seed and target": (_request(seed=to_tensor(np.ones(SCORES, np.float32)), target=E.Target(class_index=0)), "options.seed"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_targets_are_invalid_argument_naming_the_field(client, case) -> None:
    message, field = BAD[case]
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Explain(message, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert field in [f for f, _ in bad_request(error.value)], error.value.details()


def test_streams_and_expansions_prefix_the_field(client) -> None:
    message, field = BAD["detection index"]
    for call in (lambda: list(client.stub.ExplainStream(S.ExplainStreamRequest(request=message), timeout=60)),
                 lambda: client.stub.Expand(S.ExpandRequest(request=message, path=[0]), timeout=60)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"request.{field}" in [f for f, _ in bad_request(error.value)], error.value.details()


def test_the_client_command_lists_boxes_and_explains_one(server, capsys, tmp_path) -> None:
    assert main(["client", "predict", "--server", server.address, MODEL, str(PAGE)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 10 and "'title'" in listed[4]
    html = tmp_path / "remote.html"
    code = main(["client", "explain", "--server", server.address, MODEL, str(PAGE), "--target-detection", "4", "--spread",
                 "--top-k", "2", "--depth", "1", "--html", str(html)])
    assert code == 0 and "detection 4 'title' (class 1) at [" in capsys.readouterr().out
    assert "detection 4 &#39;title&#39;" in html.read_text()
