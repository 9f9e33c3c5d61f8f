"""End-to-end: the real server on a loopback port, every RPC from Python, results equal to the engine."""

from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from gap_service.client import GapClient
from gap_service.preprocess import decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.wire import pb
from gap_service.server.process import shared_server

pytestmark = pytest.mark.timeout(180)

MODEL = "ppocr_cls"
SERVER_ARGS = ["--model", MODEL]


@pytest.fixture(scope="module")
def server():
    return shared_server(SERVER_ARGS)


@pytest.fixture(scope="module")
def client(server):
    with GapClient(server.address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def entry():
    return load_repository(BUNDLED_REPOSITORY)[MODEL]


@pytest.fixture(scope="module")
def explainer(entry):
    return entry.explainer()


def sample_tensor(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(1, 3, 48, 192).astype(np.float32)


def sample_png(width: int = 240, height: int = 40) -> bytes:
    """A text-line-like picture: dark strokes on a light background."""
    rng = np.random.RandomState(3)
    pixels = np.full((height, width, 3), 235, np.uint8)
    for x in range(8, width - 8, 14):
        pixels[8 : height - 8, x : x + rng.randint(3, 8)] = rng.randint(0, 60)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def local_explain(entry, explainer, tensor, picture=None, **options):
    return explainer.explain(tensor, picture=picture, **options)


def assert_same_tree(remote, local, compare_children=True):
    assert len(remote.nodes) == len(local.nodes)
    assert remote.target == local.target and remote.logit == local.logit and remote.label == local.label
    assert remote.layers == local.layers
    for r, l in zip(remote.nodes, local.nodes):
        assert (r.id, r.parent, r.level, r.layer, r.channel) == (l.id, l.parent, l.level, l.layer, l.channel)
        assert r.score == l.score and r.share == l.share
        assert r.map.dtype == np.float32 and np.array_equal(r.map, l.map), f"map of node {r.id}"
        if compare_children:
            assert r.children == l.children


def test_health_and_reflection(server, client):
    assert client.health() == "SERVING"
    assert client.health(pb.SERVICE_NAME) == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"gap.v1.GapService", "grpc.health.v1.Health"} <= names


def test_list_and_get_model(client, entry, explainer):
    models = client.list_models()
    assert [m.name for m in models] == [MODEL]
    assert models[0].providers == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in models[0].providers
    info = client.get_model(MODEL)
    compiled = explainer.compiled()
    assert info.model.name == MODEL and info.model.version == entry.version
    assert [(i.name, list(i.shape)) for i in info.inputs] == [("x", [1, 3, 48, 192])]
    assert info.inputs[0].dtype == pb.tensor.DATA_TYPE_FLOAT32
    assert [l.name for l in info.layers][: len(compiled.layers)] == [l.name for l in compiled.layers]
    assert all(l.default for l in info.layers if l.name in {c.name for c in compiled.layers})
    first = info.layers[0]
    assert list(first.shape) == list(compiled.layers[0].shape) and len(first.map_shape) == 2
    assert list(info.labels) == list(entry.config.labels)
    assert info.decision.logits == compiled.decision.logits and info.decision.num_classes == 2
    assert info.preprocessing.resize == "fit_height" and list(info.preprocessing.size) == [48, 192]
    assert info.limits.max_top_k == 64 and info.limits.max_tree_nodes > 0
    assert info.limits.max_response_bytes > info.limits.max_tree_nodes * 4 * 24 * 96
    assert info.load_seconds > 0
    with pytest.raises(grpc.RpcError) as error:
        client.get_model(MODEL, version=7)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_predict_equals_engine(client, explainer):
    tensor = sample_tensor()
    prediction = client.predict(MODEL, tensor=tensor, top_k=10)
    compiled = explainer.compiled()
    names = [compiled.decision.logits, compiled.decision.probabilities]
    local = compiled.forward(explainer.feeds(tensor), names)
    assert np.array_equal(prediction.logits, local[names[0]])
    order = np.argsort(-local[names[0]].reshape(-1), kind="stable")
    assert [c[0] for c in prediction.classes] == list(order)  # top_k beyond the class count: all classes
    assert prediction.classes[0][3] == pytest.approx(float(local[names[1]].reshape(-1)[order[0]]))
    assert prediction.classes[0][1] in ("0", "180")
    png = client.predict(MODEL, image=sample_png(), top_k=1)
    assert len(png.classes) == 1


def test_explain_equals_engine_tensor(client, entry, explainer):
    tensor = sample_tensor()
    for options in ({}, {"top_k": 3, "depth": 4, "score": "positive"}, {"target": 0, "min_share": 0.05, "depth": 2}):
        remote = client.explain(MODEL, tensor=tensor, **options)
        local = local_explain(entry, explainer, tensor, **options)
        assert_same_tree(remote, local)
        assert remote.probability == local.probability


def test_explain_equals_engine_image(client, entry, explainer):
    png = sample_png()
    tensor, picture = preprocess(decode_image(png), entry.config.preprocessing)
    remote = client.explain(MODEL, image=png, picture=True, cams=True)
    local = local_explain(entry, explainer, tensor, picture)
    assert_same_tree(remote, local)
    assert np.array_equal(remote.picture, picture)
    assert set(remote.cams) == set(local.cams)
    for name in local.cams:
        assert np.array_equal(remote.cams[name], local.cams[name])


def test_explain_outputs(client, entry, explainer):
    tensor = sample_tensor(1)
    local = local_explain(entry, explainer, tensor, depth=2)
    request = client.explain_request(MODEL, tensor=tensor, depth=2, map_dtype="float16", heatmaps=True)
    response = client.stub.Explain(request, timeout=30)
    assert response.engine_seconds > 0
    for node, expected in zip(response.explanation.nodes, local.nodes):
        assert node.map.dtype == pb.tensor.DATA_TYPE_FLOAT16
        values = np.frombuffer(node.map.data, "<f2").reshape(node.map.shape)
        assert np.array_equal(values, expected.map.astype(np.float16))
        picture = Image.open(io.BytesIO(node.heatmap_png))
        assert picture.size == (192, 48) and picture.mode == "RGB"
        assert list(node.path) == local.path(expected.id)
    request.output.omit_maps = True
    request.output.heatmaps = False
    slim = client.stub.Explain(request, timeout=30)
    assert not any(n.HasField("map") for n in slim.explanation.nodes)


def test_explain_stream_levels_in_order(client, entry, explainer):
    tensor = sample_tensor()
    local = local_explain(entry, explainer, tensor, depth=4, top_k=3)
    request = client.explain_request(MODEL, tensor=tensor, depth=4, top_k=3, cams=True)
    messages = list(client.stub.ExplainStream(pb.service.ExplainStreamRequest(request=request), timeout=30))
    levels = [m.level for m in messages if not m.HasField("summary")]
    assert levels == list(range(5))
    assert messages[0].HasField("header") and messages[0].header.target == local.target
    assert messages[1].HasField("root") and messages[-1].HasField("summary")
    assert messages[-1].summary.node_count == len(local.nodes)
    seen = 0
    for message in messages[:-1]:
        assert [n.id for n in message.nodes] == list(range(seen, seen + len(message.nodes)))
        assert all(n.level == message.level for n in message.nodes)
        assert all(not n.children for n in message.nodes)  # sent before the next level exists
        seen += len(message.nodes)
    # The library assembles the same tree as Explain.
    streamed = list(client.explain_stream(MODEL, tensor=tensor, depth=4, top_k=3, cams=True))
    assert streamed[-1].done
    tree = streamed[-1].explanation
    assert_same_tree(tree, local)
    assert tree.probability == local.probability
    assert np.array_equal(tree.cams["gradcam"], local.cams["gradcam"])


def test_explain_stream_first_level_arrives_early(client):
    """Level 0 (the decision) arrives before the deepest level is computed."""
    tensor = sample_tensor(2)
    started = time.perf_counter()
    arrivals = []
    for level in client.explain_stream(MODEL, tensor=tensor, depth=5, top_k=4, omit_maps=True):
        arrivals.append((level.level, time.perf_counter() - started))
    assert arrivals[0][0] == 0 and arrivals[-2][0] == 5
    assert arrivals[0][1] < arrivals[-2][1]


@pytest.mark.parametrize("node_id", [0, 1, 3, 7, 12])
def test_expand_equals_subtree(client, entry, explainer, node_id):
    tensor = sample_tensor()
    full = local_explain(entry, explainer, tensor, depth=4, top_k=3)
    node = full.nodes[node_id]
    path = full.path(node_id)
    depth = 4 - node.level
    expansion = client.expand(MODEL, path, tensor=tensor, depth=depth, top_k=3)
    subtree = [node]
    for current in subtree:
        subtree.extend(full.nodes[c] for c in current.children)
    subtree.sort(key=lambda n: n.id)
    remote = expansion.explanation.nodes
    assert len(remote) == len(subtree)
    assert remote[0].parent is None and remote[0].level == node.level
    for r, l in zip(remote, subtree):
        assert expansion.paths[r.id] == full.path(l.id)
        assert (r.level, r.layer, r.channel, r.score, r.share) == (l.level, l.layer, l.channel, l.score, l.share)
        assert np.array_equal(r.map, l.map)
        assert [expansion.paths[c] for c in r.children] == [full.path(c) for c in l.children]


def test_metrics_and_logs(server, client):
    client.explain(MODEL, tensor=sample_tensor(), depth=1)
    text = server.metrics_text()
    assert 'gap_requests_total{code="OK",rpc="Explain"}' in text
    assert "gap_request_duration_seconds_bucket" in text and 'gap_nodes_computed_total{model="ppocr_cls"}' in text
    assert 'gap_queue_depth{pool="explain"}' in text and 'gap_model_load_seconds{model="ppocr_cls"}' in text
    assert 'gap_model_info{model="ppocr_cls",provider="CPUExecutionProvider",version="1"}' in text or "CUDA" in text
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = server.requests("Explain")
        if lines and lines[-1]["nodes"] == 6:
            break
        time.sleep(0.05)
    line = lines[-1]
    assert line["model"] == MODEL and line["code"] == "OK" and line["nodes"] == 6 and line["duration_ms"] > 0
