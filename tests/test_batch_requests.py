"""Several inputs per call (PredictRequest/ExplainRequest.inputs) and OutputOptions.map_levels,
against the real server on a loopback port: each result equals the same input's single call."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from test_server import MODEL, SERVER_ARGS, assert_same_tree, sample_png, sample_tensor  # the same shared server

from gap_service.client import GapClient, bad_request
from gap_service.preprocess import decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.server.process import ServerProcess, shared_server
from gap_service.wire import pb

pytestmark = pytest.mark.timeout(300)
S = pb.service


@pytest.fixture(scope="module")
def server():
    return shared_server(SERVER_ARGS)


@pytest.fixture(scope="module")
def client(server):
    with GapClient(server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def entry():
    return load_repository(BUNDLED_REPOSITORY)[MODEL]


def five_inputs() -> list:
    """Four tensors and an image: a request may mix them."""
    return [sample_tensor(seed) for seed in range(4)] + [sample_png()]


def single(client: GapClient, item, **options):
    return client.explain(MODEL, **({"tensor": item} if isinstance(item, np.ndarray) else {"image": item}), **options)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def fields(error: grpc.RpcError) -> list[str]:
    return [field for field, _ in bad_request(error)]


def test_explain_of_five_inputs_equals_five_single_explains(client, entry):
    inputs = five_inputs()
    trees = client.explain_many(MODEL, inputs, depth=3, top_k=3, cams=True, picture=True)
    assert len(trees) == 5
    for item, tree in zip(inputs, trees, strict=True):
        alone = single(client, item, depth=3, top_k=3, cams=True, picture=True)
        assert_same_tree(tree, alone)  # maps bit for bit, children, scores
        assert tree.probability == alone.probability and [tree.path(n.id) for n in tree.nodes] == \
            [alone.path(n.id) for n in alone.nodes]
        assert set(tree.cams) == set(alone.cams) and all(np.array_equal(tree.cams[k], alone.cams[k]) for k in tree.cams)
        assert (tree.picture is None) == (alone.picture is None)
    # ... and the in-process engine's, for the image too (the server applies the model's preprocessing).
    tensor, picture = preprocess(decode_image(inputs[4]), entry.config.preprocessing)
    assert_same_tree(trees[4], entry.explainer().explain(tensor, picture=picture, depth=3, top_k=3))
    assert np.array_equal(trees[4].picture, picture)
    raw = client.stub.Explain(client.explain_request(MODEL, inputs=inputs, depth=1, top_k=2), timeout=60)
    assert not raw.HasField("explanation") and len(raw.explanations) == 5 and raw.engine_seconds > 0


def test_predict_of_several_inputs_equals_single_predicts(client):
    inputs = five_inputs()
    predictions = client.predict_many(MODEL, inputs, top_k=2)
    assert len(predictions) == 5
    for item, prediction in zip(inputs, predictions, strict=True):
        alone = client.predict(MODEL, **({"tensor": item} if isinstance(item, np.ndarray) else {"image": item}), top_k=2)
        assert np.array_equal(prediction.logits, alone.logits) and prediction.classes == alone.classes
        assert prediction.engine_seconds > 0
    response = client.stub.Predict(S.PredictRequest(model=MODEL, inputs=[S.Input(image=sample_png())] * 3), timeout=30)
    assert not response.HasField("logits") and not response.classes and len(response.results) == 3
    assert response.engine_seconds == pytest.approx(sum(r.engine_seconds for r in response.results))


def test_explain_stream_of_several_inputs_assembles_the_same_trees(client):
    inputs = five_inputs()[:3]
    request = client.explain_request(MODEL, inputs=inputs, depth=3, top_k=3, cams=True)
    messages = list(client.stub.ExplainStream(S.ExplainStreamRequest(request=request), timeout=60))
    assert {m.input for m in messages} == {0, 1, 2}
    for index in range(3):  # each tree's messages in its own order: header, levels, summary last
        own = [m for m in messages if m.input == index]
        assert own[0].HasField("header") and own[0].level == 0
        assert [m.level for m in own if not m.HasField("summary")] == [0, 1, 2, 3]
        assert own[-1].HasField("summary") and sum(m.HasField("summary") for m in own) == 1
    assert all(m.HasField("summary") for m in messages[-3:])  # the summaries once every tree is done
    trees = client.explain_many(MODEL, inputs, depth=3, top_k=3, cams=True)
    done = {}
    for level in client.explain_stream(MODEL, inputs=inputs, depth=3, top_k=3, cams=True):
        if level.done:
            done[level.input] = level.explanation
    assert sorted(done) == [0, 1, 2]
    for index, tree in enumerate(trees):
        assert_same_tree(done[index], tree)
        assert done[index].probability == tree.probability
        assert np.array_equal(done[index].cams["gradcam"], tree.cams["gradcam"])


@pytest.mark.parametrize("bad, field", [
    (S.Input(tensor=pb.tensor.Tensor(dtype=pb.tensor.DATA_TYPE_FLOAT32, shape=[1, 3, 48, 100],
                                     data=np.zeros((1, 3, 48, 100), "<f4").tobytes())), "inputs[2].tensor.shape"),
    (S.Input(tensor=pb.tensor.Tensor(dtype=pb.tensor.DATA_TYPE_FLOAT32, shape=[1, 3, 48, 192], data=b"\0" * 12)),
     "inputs[2].tensor.data"),
    (S.Input(image=b"\x89PNG\r\n\x1a\nnot really"), "inputs[2].image"),
    (S.Input(), "inputs[2]"),
])
def test_a_bad_input_among_good_ones_fails_the_request_naming_it(client, bad, field):
    request = client.explain_request(MODEL, inputs=five_inputs(), depth=1, top_k=2)
    request.inputs[2].CopyFrom(bad)
    error = rpc_error(lambda: client.stub.Explain(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == [field], bad_request(error)
    assert error.details().startswith(field)
    stream = S.ExplainStreamRequest(request=request)
    error = rpc_error(lambda: list(client.stub.ExplainStream(stream, timeout=60)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == [f"request.{field}"]
    predict = S.PredictRequest(model=MODEL, inputs=request.inputs)
    error = rpc_error(lambda: client.stub.Predict(predict, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == [field]


def test_a_tree_that_fails_on_another_field_names_its_input_first(client):
    """A target is resolved per input, in its tree: its failure names the input, then the target's field."""
    error = rpc_error(lambda: client.explain_many(MODEL, five_inputs()[:2], depth=1, target=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["inputs[0]", "options.target.class_index"]
    assert error.details() == "inputs[0]: options.target.class_index: class 5 is out of range [0, 2)"


def test_too_many_inputs_are_refused(client):
    limit = client.get_model(MODEL).limits.max_batch_inputs
    assert limit == 64
    too_many = [sample_tensor(0)] * (limit + 1)
    for call in (lambda: client.explain_many(MODEL, too_many, depth=1),
                 lambda: client.predict_many(MODEL, too_many),
                 lambda: list(client.explain_stream(MODEL, inputs=too_many, depth=1))):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 64" in error.details()
        assert fields(error) in (["inputs"], ["request.inputs"])


def test_the_limit_is_a_server_flag():
    with ServerProcess(["--model", MODEL, "--max-batch-inputs", "2", "--no-warmup"]) as small, \
            GapClient(small.address, timeout=120) as client:
        assert client.get_model(MODEL).limits.max_batch_inputs == 2
        assert len(client.explain_many(MODEL, [sample_tensor(0)] * 2, depth=1)) == 2
        error = rpc_error(lambda: client.explain_many(MODEL, [sample_tensor(0)] * 3, depth=1))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2" in error.details()


def test_a_batch_whose_worst_case_response_does_not_fit_is_refused_before_the_work(client, server):
    limits = client.get_model(MODEL).limits
    inputs = [sample_tensor(seed) for seed in range(20)]
    # 20 trees of 156 nodes, each with a float32 map and a heatmap: more than max_response_bytes.
    error = rpc_error(lambda: client.explain_many(MODEL, inputs, depth=3, top_k=5, heatmaps=True))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and fields(error) == ["inputs"]
    assert f"max_response_bytes ({limits.max_response_bytes})" in error.details() and "map_levels" in error.details()
    # The same trees with maps down to level 1 only fit, and are computed.
    trees = client.explain_many(MODEL, inputs, depth=3, top_k=5, heatmaps=True, map_levels=1)
    assert len(trees) == 20 and all(n.map.size == 0 for t in trees for n in t.nodes if n.level > 1)


def test_map_levels_keeps_maps_down_to_that_level(client):
    inputs = five_inputs()[:2]
    full = client.explain_many(MODEL, inputs, depth=3, top_k=3)
    request = client.explain_request(MODEL, inputs=inputs, depth=3, top_k=3, heatmaps=True, map_levels=1,
                                     map_dtype="float16")
    response = client.stub.Explain(request, timeout=60)
    for message, tree in zip(response.explanations, full, strict=True):
        assert [n.level for n in message.nodes] == [n.level for n in tree.nodes]
        for node, expected in zip(message.nodes, tree.nodes):
            assert node.score == expected.score and node.share == expected.share and list(node.path) == tree.path(node.id)
            if node.level <= 1:
                values = np.frombuffer(node.map.data, "<f2").reshape(node.map.shape)
                assert np.array_equal(values, expected.map.astype(np.float16))
                assert Image.open(io.BytesIO(node.heatmap_png)).size == (192, 48)
            else:
                assert not node.HasField("map") and not node.heatmap_png
    root_only = client.explain(MODEL, tensor=sample_tensor(), depth=2, top_k=2, map_levels=0)
    assert root_only.nodes[0].map.size > 0 and all(n.map.size == 0 for n in root_only.nodes[1:])
    # In a stream the root's map comes with level 1, the deeper levels without maps.
    for level in client.explain_stream(MODEL, inputs=inputs, depth=2, top_k=2, map_levels=0):
        assert all(n.map.size == 0 for n in level.nodes if n.level > 0)
        if level.done:
            assert level.explanation.nodes[0].map.size > 0
    request.output.map_levels = -1
    error = rpc_error(lambda: client.stub.Explain(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["output.map_levels"]


def test_input_and_inputs_together_are_refused(client):
    request = client.explain_request(MODEL, inputs=five_inputs()[:2], depth=1)
    request.input.CopyFrom(S.Input(image=sample_png()))
    for call in (lambda: client.stub.Explain(request, timeout=30),
                 lambda: client.stub.Predict(S.PredictRequest(model=MODEL, input=request.input, inputs=request.inputs),
                                             timeout=30)):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["input", "inputs"]
    with pytest.raises(ValueError):
        client.explain_request(MODEL, tensor=sample_tensor(), inputs=[sample_tensor()])


def test_expand_and_the_report_take_one_input(client):
    request = client.explain_request(MODEL, inputs=five_inputs()[:2], depth=1)
    error = rpc_error(lambda: client.stub.Expand(S.ExpandRequest(request=request, path=[]), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["request.inputs"]
    request.output.report = True
    error = rpc_error(lambda: client.stub.Explain(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["output.report"]
    with pytest.raises(TypeError):
        client.explain(MODEL, inputs=[sample_tensor()])
