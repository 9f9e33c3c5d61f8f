"""Bad requests, limits, deadlines and cancellation: the right status code each, and the server stays fine."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from gap_service.client import GapClient
from gap_service.wire import pb
from gap_service.client import bad_request
from gap_service.server.process import ServerProcess

pytestmark = pytest.mark.timeout(240)

MODEL = "ppocr_cls"
S = pb.service
C = grpc.StatusCode


@pytest.fixture(scope="module")
def server():
    args = ["--model", MODEL, "--max-concurrent", "1", "--max-queue", "2", "--max-image-pixels", "1000000",
            "--max-tree-nodes", "1400", "--max-request-bytes", str(4 * 2**20)]
    with ServerProcess(args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with GapClient(server.address, timeout=60) as client:
        yield client


def tensor(shape=(1, 3, 48, 192), dtype=np.float32, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(dtype)


def request(**fields) -> pb.service.ExplainRequest:
    message = S.ExplainRequest(model=MODEL, input=S.Input(tensor=_tensor_proto(tensor())))
    for name, value in fields.items():
        target = message
        *parents, leaf = name.split(".")
        for parent in parents:
            target = getattr(target, parent)
        if hasattr(value, "DESCRIPTOR"):
            getattr(target, leaf).CopyFrom(value)
        elif isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return message


def _tensor_proto(array):
    from gap_service.wire.tensors import to_tensor

    return to_tensor(array)


def call_error(client, method, message, timeout=30):
    with pytest.raises(grpc.RpcError) as error:
        result = getattr(client.stub, method)(message, timeout=timeout)
        if method == "ExplainStream":
            list(result)
    return error.value


def png_bytes(width, height):
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_ARGUMENTS = {
    "no model": (request(model=""), "model"),
    "no input": (S.ExplainRequest(model=MODEL), "input"),
    "unspecified dtype": (request(**{"input.tensor.dtype": 0}), "input.tensor.dtype"),
    "unknown dtype value": (request(**{"input.tensor.dtype": 99}), "input.tensor.dtype"),
    "wrong dtype": (request(**{"input.tensor": _tensor_proto(tensor(dtype=np.float64))}), "input.tensor.dtype"),
    "wrong shape": (request(**{"input.tensor": _tensor_proto(tensor((1, 3, 48, 96)))}), "input.tensor.shape"),
    "wrong rank": (request(**{"input.tensor": _tensor_proto(tensor((3, 48, 192)))}), "input.tensor.shape"),
    "negative dim": (request(**{"input.tensor": pb.tensor.Tensor(dtype=1, shape=[1, -3, 48, 192])}), "input.tensor.shape"),
    "byte count": (request(**{"input.tensor": pb.tensor.Tensor(dtype=1, shape=[1, 3, 48, 192], data=b"\0" * 100)}),
                   "input.tensor.data"),
    "nan": (request(**{"input.tensor": _tensor_proto(np.full((1, 3, 48, 192), np.nan, np.float32))}), "input.tensor.data"),
    "unknown input name": (request(**{"input.tensor.name": "nope"}), "input.tensor.name"),
    "corrupt image": (request(**{"input.image": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50}), "input.image"),
    "empty image": (S.ExplainRequest(model=MODEL, input=S.Input(image=b"")), "input"),
    "top_k=0": (request(**{"options.top_k": 0}), "options.top_k"),
    "top_k=10^6": (request(**{"options.top_k": 10**6}), "options.top_k"),
    "depth=0": (request(**{"options.depth": 0}), "options.depth"),
    "depth too deep": (request(**{"options.depth": 99, "options.top_k": 1}), "options.depth"),
    "target out of range": (request(**{"options.target.class_index": 2}), "options.target.class_index"),
    "negative target": (request(**{"options.target.class_index": -1}), "options.target.class_index"),
    "min_share": (request(**{"options.min_share": 1.5}), "options.min_share"),
    "nan min_share": (request(**{"options.min_share": float("nan")}), "options.min_share"),
    "score enum": (request(**{"options.score": 7}), "options.score"),
    "map dtype": (request(**{"output.map_dtype": pb.tensor.DATA_TYPE_INT8}), "output.map_dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_invalid_argument_with_field_violation(client, case):
    message, field = BAD_ARGUMENTS[case]
    error = call_error(client, "Explain", message)
    assert error.code() == C.INVALID_ARGUMENT, error.details()
    fields = [f for f, _ in bad_request(error)]
    assert field in fields or (field == "input" and any(f.startswith("input") for f in fields)), (fields, error.details())


def test_malformed_request_bytes(client):
    raw = client.channel.unary_unary("/gap.v1.GapService/Explain", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\x0a\xff\xff\xff\xff\x0f garbage that is not a message", timeout=10)
    assert error.value.code() == C.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(error.value)] == ["request"]


def test_not_found(client):
    error = call_error(client, "Explain", request(model="no_such_model"))
    assert error.code() == C.NOT_FOUND and "no_such_model" in error.details()
    error = call_error(client, "Explain", request(**{"options.layers": ["no_such_layer"]}))
    assert error.code() == C.NOT_FOUND and "no_such_layer" in error.details()
    error = call_error(client, "Predict", S.PredictRequest(model="nope", input=request().input))
    assert error.code() == C.NOT_FOUND
    error = call_error(client, "Explain", request(version=3))
    assert error.code() == C.NOT_FOUND


def test_resource_exhausted(client):
    huge = png_bytes(2000, 1000)  # 2 Mpixel > the 1 Mpixel limit of this server
    error = call_error(client, "Explain", request(**{"input.image": huge}))
    assert error.code() == C.RESOURCE_EXHAUSTED and "pixels" in error.details()
    error = call_error(client, "Explain", request(**{"options.top_k": 20, "options.depth": 3}))
    assert error.code() == C.RESOURCE_EXHAUSTED and "nodes" in error.details()
    big = S.ExplainRequest(model=MODEL, input=S.Input(image=b"\0" * (5 * 2**20)))
    error = call_error(client, "Explain", big)
    assert error.code() == C.RESOURCE_EXHAUSTED  # over the max request size


def test_expand_bad_paths(client):
    error = call_error(client, "Expand", S.ExpandRequest(request=request(), path=[10**6]))
    assert error.code() == C.INVALID_ARGUMENT and [f for f, _ in bad_request(error)] == ["path[0]"]
    error = call_error(client, "Expand", S.ExpandRequest(request=request(), path=[-1]))
    assert error.code() == C.INVALID_ARGUMENT
    full = client.explain(MODEL, tensor=tensor(), depth=1, top_k=2)
    kept = {full.nodes[c].channel for c in full.root.children}
    other = next(c for c in range(100) if c not in kept)
    message = S.ExpandRequest(request=request(**{"options.top_k": 2}), path=[other])
    error = call_error(client, "Expand", message)
    assert error.code() == C.INVALID_ARGUMENT and "not a supporting channel" in error.details()


def test_deadline_1ms(client):
    for method, message in (("Explain", request()), ("ExplainStream", S.ExplainStreamRequest(request=request()))):
        error = call_error(client, method, message, timeout=0.001)
        assert error.code() == C.DEADLINE_EXCEEDED
    assert client.health() == "SERVING"


def test_deadline_during_computation_stops_it(server, client):
    started = time.perf_counter()
    full = client.explain(MODEL, tensor=tensor(), depth=5, top_k=4, omit_maps=True)
    elapsed = time.perf_counter() - started
    message = request(**{"options.depth": 5, "options.top_k": 4, "output.omit_maps": True})
    error = call_error(client, "Explain", message, timeout=max(0.02, elapsed * 0.3))
    assert error.code() == C.DEADLINE_EXCEEDED
    record = _wait_record(server, "Explain", lambda r: r["code"] == "DEADLINE_EXCEEDED")
    assert record["nodes"] < len(full.nodes), "the explanation went on computing past its deadline"


def _wait_record(server, rpc, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in server.requests(rpc) if predicate(r)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {rpc} log line matching; log:\n{server.log_text()[-3000:]}")


def test_client_cancel_mid_stream_stops_computing(server, client):
    full = client.explain(MODEL, tensor=tensor(), depth=5, top_k=4, omit_maps=True)
    stream = S.ExplainStreamRequest(request=request(**{"options.depth": 5, "options.top_k": 4}))
    call = client.stub.ExplainStream(stream, timeout=60)
    first = next(call)
    assert first.level == 0
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == C.CANCELLED
    record = _wait_record(server, "ExplainStream", lambda r: r["code"] == "CANCELLED")
    assert record["nodes"] < len(full.nodes), "the cancelled explanation went on computing"
    # The slot was given back: the next explanation runs at once.
    assert len(client.explain(MODEL, tensor=tensor(), depth=1).nodes) > 1


def test_50_concurrent_clients_over_the_limit(server, client):
    options = dict(depth=4, top_k=4, omit_maps=True)  # a few hundred milliseconds each on 2 cores
    reference = client.explain(MODEL, tensor=tensor(), **options)
    codes: list[str] = []
    lock = threading.Lock()

    def one(_):
        with GapClient(server.address, timeout=60) as own:
            try:
                result = own.explain(MODEL, tensor=tensor(), **options)
                assert [n.channel for n in result.nodes] == [n.channel for n in reference.nodes]
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
        with lock:
            codes.append(code)

    side_results = []

    def side_traffic():
        for _ in range(5):
            side_results.append((client.health(), len(client.list_models()), client.get_model(MODEL).model.name))
            time.sleep(0.05)

    side = threading.Thread(target=side_traffic)
    with ThreadPoolExecutor(50) as pool:
        side.start()
        list(pool.map(one, range(50)))
    side.join()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.count("OK") >= 3 and codes.count("RESOURCE_EXHAUSTED") >= 1, codes
    assert side_results == [("SERVING", 1, MODEL)] * 5
    text = server.metrics_text()
    assert 'gap_requests_total{code="RESOURCE_EXHAUSTED",rpc="Explain"}' in text
    after = client.explain(MODEL, tensor=tensor(), **options)
    assert [n.score for n in after.nodes] == [n.score for n in reference.nodes]


def test_still_serving_after_everything(client):
    assert client.health() == "SERVING"
    assert client.predict(MODEL, tensor=tensor()).classes
