"""The HTTP/JSON gateway (gap_service/server/http.py) for real: servers on loopback with --http-port,
requests with http.client and raw sockets, nginx in front of three replicas.

* Every route answers what its RPC answers over gRPC (the same message after the JSON round trip);
  GET query parameters; the stream arrives one level at a time.
* Errors: the gRPC status under google.rpc's HTTP status with the server's field violations, and the
  gateway's own refusals (bad JSON, unknown fields, routes, methods, sizes) without tracebacks; the
  server keeps answering after each.
* Static files (and traversal attempts), the colour map, API keys, TLS and mTLS, deadlines, client
  disconnects, bounded connections, the drain on SIGTERM.
* docker/nginx/gap-http.conf on loopback: Expand answered by several replicas with identical subtrees,
  the stream unbuffered, gap-http.d/tls.conf with mTLS to a replica.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from gap_service.client import GapClient, explain_request
from gap_service.colors import TURBO, colormap
from gap_service.server import http as gateway_module
from gap_service.server.http import HttpGateway
from gap_service.server.transcoding import Route, parse_template, request_message, routes
from gap_service.server.process import ServerProcess
from gap_service.wire import pb

ROOT = Path(__file__).resolve().parent.parent
HTTP_CONF = ROOT / "docker" / "nginx" / "gap-http.conf"
HTTP_TLS = ROOT / "docker" / "nginx" / "gap-http.d" / "tls.conf"
OCR, NET = "ppocr_cls", "efficientnet_lite0"  # NET has the bundled channel atlas
NET_LAYER = "/_blocks.5/_swish/Clip_output_0"
S, E = pb.service, pb.explanation

pytestmark = pytest.mark.timeout(240)

from support.harness import load_lb, nginx_or_skip  # noqa: E402

lb = load_lb()


# -- helpers ------------------------------------------------------------------------------------------
class Answer:
    def __init__(self, response: http.client.HTTPResponse, body: bytes) -> None:
        self.status, self.headers, self.body = response.status, response.headers, body

    def json(self):
        return json.loads(self.body)

    def message(self, message_type):
        return json_format.ParseDict(self.json(), message_type())


def http_port(server) -> int:
    entries = server.log_entries()
    return next(e["http_port"] for e in entries if e.get("event") == "listening")


def call(port: int, method: str, path: str, body: object = None, headers: dict | None = None, timeout: float = 120,
         context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> Answer:
    """One request on a fresh connection; a dict body is sent as JSON."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    connection = (http.client.HTTPSConnection(host, port, timeout=timeout, context=context) if context
                  else http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Answer(response, response.read())
    finally:
        connection.close()


def raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Bytes on a socket, the answer until the server closes or stops sending."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: (\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


def png(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def to_body(message) -> dict:
    return json_format.MessageToDict(message)


def without_timings(message):
    """A copy without the fields that differ from call to call (seconds spent)."""
    copy = type(message)()
    copy.CopyFrom(message)
    for name in ("engine_seconds",):
        if name in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    if copy.DESCRIPTOR.name == "ExplainStreamResponse" and copy.HasField("summary"):
        copy.summary.ClearField("engine_seconds")
    return copy


def violations(answer: Answer) -> dict[str, str]:
    found = {}
    for detail in answer.json()["details"]:
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        found.update({v["field"]: v["description"] for v in detail["fieldViolations"]})
    return found


def still_serving(port: int) -> None:
    answer = call(port, "GET", "/v1/models")
    assert answer.status == 200 and answer.json()["models"], answer.body


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", OCR, "--model", NET, "--http-port", "0", "--max-request-bytes", str(4 * 2**20)]) as server:
        yield server


@pytest.fixture(scope="module")
def port(server) -> int:
    return http_port(server)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield pb.service_grpc.GapServiceStub(channel)


@pytest.fixture(scope="module")
def image() -> bytes:
    return png(200, 60)


# -- routes from the annotations ---------------------------------------------------------------------
def test_routes_are_the_descriptors_annotations():
    found = {route.rpc: (route.method, route.template, route.body, route.streaming) for route in routes()}
    assert found == {
        "ListModels": ("GET", "/v1/models", "", False), "GetModel": ("GET", "/v1/models/{model}", "", False),
        "Predict": ("POST", "/v1/models/{model}:predict", "*", False),
        "Explain": ("POST", "/v1/models/{model}:explain", "*", False),
        "ExplainStream": ("POST", "/v1/models/{request.model}:explainStream", "*", True),
        "Expand": ("POST", "/v1/models/{request.model}:expand", "*", False),
        "GetChannel": ("GET", "/v1/models/{model}/channel", "", False),
    }
    assert parse_template("/v1/models/{request.model}:expand") == (("v1", "models", None), (("request", "model"),), "expand")
    assert parse_template("/v1/models/{model}/channel") == (("v1", "models", None, "channel"), (("model",),), "")
    assert parse_template("/v1/{name=*}") == (("v1", None), (("name",),), "")
    for unsupported in ("/v1/{name=**}", "/v1/*", "/v1/{name=models/*}", "v1/models", "/v1//models"):
        with pytest.raises(ValueError):
            parse_template(unsupported)
    # Percent-encoded path values are decoded; an encoded colon is data, not a verb.
    (explain,) = [r for r in routes() if r.rpc == "Explain"]
    (get_model,) = [r for r in routes() if r.rpc == "GetModel"]
    assert explain.match(["v1", "models", "a%20b:explain"]) == {("model",): "a b"}
    assert explain.match(["v1", "models", "a%3Aexplain"]) is None
    assert get_model.match(["v1", "models", "a%3Aexplain"]) == {("model",): "a:explain"}


def test_query_parameters_map_onto_request_fields_as_grpc_gateway_does():
    """Dotted paths, proto or JSON names, int64, bool, enums, repeated fields (a GET rule for Explain)."""
    (explain,) = [r for r in routes() if r.rpc == "Explain"]
    as_get = Route(**{**explain.__dict__, "method": "GET", "body": ""})
    query = ("version=7&options.layers=a%2Fb%3A0&options.layers=c&options.topK=3&options.score=SCORE_MODE_POSITIVE"
             "&output.heatmaps=true&output.omit_maps=1&output.map_dtype=2&options.min_share=0.25")
    message = request_message(as_get, {("model",): "m"}, query, None)
    assert message == S.ExplainRequest(
        model="m", version=7, options=E.ExplainOptions(layers=["a/b:0", "c"], top_k=3, score=E.SCORE_MODE_POSITIVE, min_share=0.25),
        output=E.OutputOptions(heatmaps=True, omit_maps=True, map_dtype=pb.tensor.DATA_TYPE_FLOAT16))
    refused = {
        "nope=1": "unknown query parameter 'nope'",
        "options.top_k=1&options.top_k=2": "given twice",
        "output.heatmaps=maybe": "is not true or false",
        "options=1": "is a message",
        "model=x": "already in the path",
        "version=x": "Failed to parse version field",
        "options.score=SCORE_MODE_NONE": "SCORE_MODE_NONE",
        "version=%ff": "not percent-encoded UTF-8",
    }
    for query, needle in refused.items():
        with pytest.raises(gateway_module.HttpError) as error:
            request_message(as_get, {("model",): "m"}, query, None)
        assert error.value.status == 400 and needle in error.value.message, (query, error.value.message)


# -- every route against its gRPC answer -----------------------------------------------------------------
def test_every_route_answers_what_its_rpc_answers(port, stub, image):
    answer = call(port, "GET", "/v1/models")
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
    assert answer.message(S.ListModelsResponse) == stub.ListModels(S.ListModelsRequest())
    assert answer.json()["models"][0]["version"] == "1", "int64 as strings, camelCase names"

    answer = call(port, "GET", f"/v1/models/{OCR}?version=1")
    assert answer.message(S.GetModelResponse) == stub.GetModel(S.GetModelRequest(model=OCR, version=1))
    assert answer.json()["layers"][0]["channelAxis"] == 1 and "default" in answer.json()["layers"][0]

    tensor = np.random.RandomState(0).randn(1, 3, 48, 192).astype(np.float32)
    predict = S.PredictRequest(input=S.Input(tensor=pb.tensor.Tensor(dtype=pb.tensor.DATA_TYPE_FLOAT32, shape=[1, 3, 48, 192],
                                                                     data=tensor.tobytes())), top_k=2)
    answer = call(port, "POST", f"/v1/models/{OCR}:predict", to_body(predict))
    assert answer.status == 200, answer.body
    predict.model = OCR  # the path's value
    assert without_timings(answer.message(S.PredictResponse)) == without_timings(stub.Predict(predict))

    request = explain_request(OCR, image=image, depth=2, top_k=3, heatmaps=True, picture=True)
    body = to_body(request)
    assert body.pop("model") == OCR
    answer = call(port, "POST", f"/v1/models/{OCR}:explain", body)
    explained = stub.Explain(request)
    assert without_timings(answer.message(S.ExplainResponse)) == without_timings(explained)
    assert answer.json()["explanation"]["nodes"][0]["id"] == 0, "fields without presence are always present"
    assert "parent" not in answer.json()["explanation"]["nodes"][0], "an unset optional field is left out"

    path = list(explained.explanation.nodes[1].path)
    expand = S.ExpandRequest(request=request, path=path)
    answer = call(port, "POST", f"/v1/models/{OCR}:expand", to_body(expand))
    assert without_timings(answer.message(S.ExpandResponse)) == without_timings(stub.Expand(expand))

    stream = S.ExplainStreamRequest(request=request)
    answer = call(port, "POST", f"/v1/models/{OCR}:explainStream", to_body(stream))
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in answer.body.splitlines()]
    assert all(set(line) == {"result"} for line in lines)
    got = [without_timings(json_format.ParseDict(line["result"], S.ExplainStreamResponse())) for line in lines]
    assert got == [without_timings(m) for m in stub.ExplainStream(stream)]

    query = f"layer={quote(NET_LAYER, safe='')}&channel=3&patches=true&version=1"
    answer = call(port, "GET", f"/v1/models/{NET}/channel?{query}")
    channel = stub.GetChannel(S.GetChannelRequest(model=NET, layer=NET_LAYER, channel=3, patches=True, version=1))
    assert answer.status == 200 and answer.message(S.GetChannelResponse) == channel and channel.strip_png
    # The body may repeat a path value; it must agree with it.
    answer = call(port, "POST", f"/v1/models/{OCR}:explain", {**body, "model": OCR, "options": {"depth": 1, "topK": 3}})
    assert answer.status == 200 and len(answer.json()["explanation"]["nodes"]) == 1 + 3
    answer = call(port, "POST", f"/v1/models/{OCR}:explain", {**body, "model": NET})
    assert answer.status == 400 and "model is 'ppocr_cls' in the path but 'efficientnet_lite0' in the body" in answer.json()["message"]


def test_the_stream_arrives_one_level_at_a_time(server, port):
    """Each level is a chunk sent as the engine finishes it: the first line is read while the server is
    still computing the deepest level (its ExplainStream call not yet logged as finished)."""
    request = S.ExplainStreamRequest(request=explain_request(NET, image=png(256, 256), depth=4, top_k=5, omit_maps=True))
    finished_before = len(server.requests("ExplainStream"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", f"/v1/models/{NET}:explainStream", json.dumps(to_body(request)),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.headers["Transfer-Encoding"] == "chunked"
    first = json.loads(response.readline())
    assert len(server.requests("ExplainStream")) == finished_before, "the first level came after the whole tree"
    assert first["result"]["level"] == 0 and first["result"]["header"]["model"] == NET
    rest = [json.loads(line) for line in response.read().splitlines()]
    connection.close()
    levels = [line["result"]["level"] for line in rest]
    assert levels == [1, 2, 3, 4, 4] and "summary" in rest[-1]["result"]
    assert sum(len(line["result"].get("nodes", [])) for line in [first, *rest]) == rest[-1]["result"]["summary"]["nodeCount"]


# -- errors ---------------------------------------------------------------------------------------------
def test_grpc_errors_keep_their_code_message_and_field_violations(port, image):
    body = {"input": {"image": base64.b64encode(image).decode()}, "options": {"topK": 99}}
    answer = call(port, "POST", f"/v1/models/{OCR}:explain", body)
    assert answer.status == 400 and answer.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert set(violations(answer)) == {"options.top_k"} and "options.top_k" in answer.json()["message"]
    answer = call(port, "POST", f"/v1/models/{OCR}:explainStream", {"request": body})
    assert answer.status == 400 and set(violations(answer)) == {"request.options.top_k"}, "an error before the first level"
    assert answer.headers["Content-Type"] == "application/json"
    answer = call(port, "POST", f"/v1/models/{OCR}:expand", {"request": {**body, "options": {}}, "path": [100000]})
    assert answer.status == 400 and set(violations(answer)) == {"path[0]"}
    answer = call(port, "GET", "/v1/models/no_such_model")
    assert answer.status == 404 and answer.json()["code"] == 5 and "no_such_model" in answer.json()["message"]
    not_an_image = {"input": {"image": base64.b64encode(b"%PDF-1.4 not an image at all").decode()}}
    answer = call(port, "POST", f"/v1/models/{OCR}:predict", not_an_image)
    assert answer.status == 400 and answer.json()["code"] == 3, answer.body
    assert "input.image" in violations(answer) and "PNG" in answer.json()["message"], answer.json()
    answer = call(port, "GET", f"/v1/models/{NET}/channel?layer=no_such_layer&channel=0")
    assert answer.status == 404 and "no_such_layer" in answer.json()["message"]
    answer = call(port, "POST", f"/v1/models/{OCR}:explain", {**body, "options": {}}, headers={"X-Gap-Timeout": "0.000001"})
    assert answer.status == 504 and answer.json()["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    still_serving(port)


def test_the_gateways_own_refusals(port, server):
    """Bad bodies, routes, methods and sizes: a JSON google.rpc.Status naming the problem, never a traceback."""
    def refused(answer: Answer, status: int, needle: str) -> None:
        assert answer.status == status, (answer.status, answer.body)
        assert answer.headers["Content-Type"] == "application/json"
        assert needle in answer.json()["message"], answer.json()
        assert "Traceback" not in answer.body.decode() and "File \"" not in answer.body.decode()

    explain = f"/v1/models/{OCR}:explain"
    json_type = {"Content-Type": "application/json"}
    refused(call(port, "POST", explain, b"{not json", json_type), 400, "not JSON")
    refused(call(port, "POST", explain, b"[1, 2]", json_type), 400, "must be a JSON object")
    refused(call(port, "POST", explain, b"[" * 100000, json_type), 400, "not JSON")
    refused(call(port, "POST", explain, b"\xff\xfe", json_type), 400, "not UTF-8")
    refused(call(port, "POST", explain, {"optoins": {}}), 400, 'no field named "optoins"')
    refused(call(port, "POST", explain, {"options": {"topK": "many"}}), 400, "topK")
    refused(call(port, "POST", explain, {"version": [1]}), 400, "version")
    refused(call(port, "POST", explain, b"{}", {"Content-Type": "text/plain"}), 415, "application/json")
    refused(call(port, "POST", f"/v1/models/{OCR}:explain?top_k=2", {}), 400, "takes no query parameters")
    refused(call(port, "GET", "/v2/models"), 404, "no route")
    refused(call(port, "GET", "/v1/models/x/y/z"), 404, "no route")
    answer = call(port, "GET", explain)
    refused(answer, 405, "GET is not allowed")
    assert answer.headers["Allow"] == "POST, OPTIONS"
    answer = call(port, "DELETE", "/v1/models")
    refused(answer, 405, "DELETE is not allowed")
    assert answer.headers["Allow"] == "GET, OPTIONS"
    refused(call(port, "POST", "/", {}), 405, "POST is not allowed")
    refused(call(port, "BREW", "/v1/models"), 501, "Unsupported method")
    answer = call(port, "OPTIONS", explain)
    assert answer.status == 204 and answer.headers["Allow"] == "POST, OPTIONS" and answer.body == b""
    assert not [h for h in answer.headers if h.lower().startswith("access-control-")], "no CORS: the page is same-origin"
    refused(call(port, "GET", "/v1/models", headers={"X-Gap-Timeout": "soon"}), 400, "X-Gap-Timeout")
    refused(call(port, "GET", "/v1/models", headers={"grpc-timeout": "10 seconds"}), 400, "grpc-timeout")
    # Sizes: the body from Content-Length alone (nothing sent after the headers), Expect: 100-continue,
    # no length, a chunked body, the request line, the header section.
    limit = 4 * 2**20
    for expect in ("", "Expect: 100-continue\r\n"):
        head = raw(port, f"POST {explain} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{expect}"
                         f"Content-Length: {limit + 1}\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head and str(limit).encode() in head, head
        assert b"100 Continue" not in head
    head = raw(port, f"POST {explain} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 411 ") and b"Content-Length is required" in head
    head = raw(port, f"POST {explain} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "2\r\n{}\r\n0\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 411 ") and b"chunked request bodies are not accepted" in head
    head = raw(port, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 ")
    head = raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"a" * 40000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    head = raw(port, b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    for garbage in (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"GET http://other.example/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n" * 10):
        answer = raw(port, garbage, timeout=5)
        assert b"Traceback" not in answer and (not answer or re.match(rb"HTTP/1.1 (400|404|505) ", answer)), (garbage, answer)
    still_serving(port)
    assert "Traceback" not in server.log_text()


# -- static files, the colour map ---------------------------------------------------------------------------
def test_static_files_and_no_way_out_of_the_folder(port):
    static = gateway_module.STATIC_DIR
    answer = call(port, "GET", "/")
    if (static / "index.html").is_file():
        assert answer.status == 200 and answer.headers["Content-Type"] == "text/html; charset=utf-8"
        assert answer.body == (static / "index.html").read_bytes()
        assert answer.headers["Cache-Control"] == "no-cache" and answer.headers["ETag"]
        again = call(port, "GET", "/", headers={"If-None-Match": answer.headers["ETag"]})
        assert again.status == 304 and again.body == b""
        head = call(port, "HEAD", "/")
        assert head.status == 200 and head.body == b"" and head.headers["Content-Length"] == str(len(answer.body))
    else:
        assert answer.status == 404 and "not installed" in answer.json()["message"]
    for file in sorted(static.glob("*.js")) if static.is_dir() else []:
        answer = call(port, "GET", f"/static/{file.name}")
        assert answer.status == 200 and answer.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert answer.body == file.read_bytes()
    for header, value in gateway_module.SECURITY_HEADERS:
        assert answer.headers[header] == value
    secret = (ROOT / "gap_service" / "server" / "app.py").read_bytes()
    for attempt in ("/static/../server/app.py", "/static/%2e%2e/server/app.py", "/static/..%2fserver%2fapp.py",
                    "/static/%2E%2E%2F%2E%2E%2Fserver%2Fapp.py", "/static/..%5c..%5cserver%5capp.py", "/static/%252e%252e/server/app.py",
                    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/.%2e/.%2e/server/app.py", "/static/./index.html",
                    "/static/", "/static/%00", "/static/..", "/../server/app.py", "/static/../../../../../../etc/passwd"):
        answer = call(port, "GET", attempt)
        assert answer.status in (400, 404), (attempt, answer.status)
        assert secret not in answer.body and b"root:" not in answer.body, attempt
    still_serving(port)


def test_the_colour_map_is_the_projects_one(port):
    answer = call(port, "GET", "/colormap.json")
    table = answer.json()
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
    assert len(table) == 256 and all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in table)
    assert table == colormap(np.linspace(0.0, 1.0, 256)).tolist()
    assert table[0] == TURBO[0].astype(int).tolist() and table[-1] == TURBO[-1].astype(int).tolist()
    assert call(port, "GET", "/colormap.json", headers={"If-None-Match": answer.headers["ETag"]}).status == 304


def test_static_files_from_a_folder_with_links_out(server, tmp_path):
    """Content types, nested files, and a symbolic link that leads out of the folder, on a gateway of
    its own over the server's gRPC port."""
    folder = tmp_path / "static"
    (folder / "sub").mkdir(parents=True)
    (folder / "index.html").write_text("<!DOCTYPE html><title>t</title>")
    (folder / "style.css").write_text("body{}")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "outside.txt").write_text("outside the folder")
    (folder / "out.txt").symlink_to(tmp_path / "outside.txt")
    (folder / "outdir").symlink_to(tmp_path)
    (folder / ".hidden").write_text("hidden")
    gateway = HttpGateway(server.address, 2**20, static_dir=folder)
    port = gateway.start("127.0.0.1", 0)
    try:
        assert call(port, "GET", "/static/style.css").headers["Content-Type"] == "text/css; charset=utf-8"
        answer = call(port, "GET", "/static/sub/data.bin")
        assert answer.status == 200 and answer.body == b"\x00\x01" and answer.headers["Content-Type"] == "application/octet-stream"
        for attempt in ("/static/out.txt", "/static/outdir/outside.txt", "/static/.hidden", "/static/sub", "/static/sub/"):
            answer = call(port, "GET", attempt)
            assert answer.status == 404 and b"outside the folder" not in answer.body and b"hidden" not in answer.body, attempt
        assert call(port, "GET", "/").body == b"<!DOCTYPE html><title>t</title>"
        assert call(port, "GET", "/v1/models").status == 200, "and the API over the given gRPC target"
    finally:
        gateway.stop(1.0)


# -- the report ----------------------------------------------------------------------------------------------
def test_report_html_is_the_cli_report_with_the_atlas_patches(server, port, stub):
    from gap_service.atlas import load_atlas
    from gap_service.methods import CAM_METHODS
    from gap_service.report import render_html
    from gap_service.repository import BUNDLED_REPOSITORY, load_repository
    from gap_service.wire import messages

    request = explain_request(NET, image=png(300, 240, seed=2), depth=2, top_k=3, report=True, picture=True, cams=True)
    answer = call(port, "POST", f"/v1/models/{NET}:explain", to_body(request))
    assert answer.status == 200
    html = base64.b64decode(answer.json()["reportHtml"])
    assert html.startswith(b"<!DOCTYPE html>") and html.rstrip().endswith(b"</html>")
    response = answer.message(S.ExplainResponse)
    tree = messages.explanation_from_proto(response.explanation)
    tree.cams = {name: tree.cams[name] for name in CAM_METHODS}  # a protobuf map has no order; the report's panels do
    assert b"<dt>Atlas</dt>" in html and html.count(b'data-sheet="') == len(tree.nodes) - 1 > 3, "every node's patches but the root's"
    # The same page the CLI writes for that tree (rebuilt here from the answer) with the model's atlas.
    atlas = load_atlas(load_repository(BUNDLED_REPOSITORY)[NET].path)
    assert render_html(tree, atlas=atlas).encode() == response.report_html
    # Only Explain fills it; without an atlas the report has no patches; unasked, no report.
    ocr = stub.Explain(explain_request(OCR, image=png(200, 60), depth=1, top_k=2, report=True))
    assert ocr.report_html.startswith(b"<!DOCTYPE html>") and b"<dt>Atlas</dt>" not in ocr.report_html
    assert not stub.Explain(explain_request(OCR, image=png(200, 60), depth=1, top_k=2)).report_html
    stream = list(stub.ExplainStream(S.ExplainStreamRequest(request=explain_request(OCR, image=png(200, 60), depth=1, top_k=2,
                                                                                    report=True))))
    assert stream[-1].summary.node_count == 3, "ExplainStream ignores the option"
    assert 'gap_running{pool="report"} 0.0' in server.metrics_text(), "reports take slots of their own pool"


# -- API keys, TLS and mTLS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    from test_security import dev_secrets

    return dev_secrets(tmp_path_factory.mktemp("secrets"))


KEY_OCR = "ocr-only-key-0123456789"


@pytest.fixture(scope="module")
def secure_server(secrets, tmp_path_factory):
    """The compose replica's security: mTLS and API keys (the development key: every model; KEY_OCR: OCR only)."""
    from test_security import tls_args, token

    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps([*json.loads(secrets["api_keys"].read_text()), {"name": "ocr", "key": KEY_OCR, "models": [OCR]}]))
    with ServerProcess(["--model", OCR, "--http-port", "0", *tls_args(secrets, mtls=True), "--api-keys", str(keys)],
                       client={"root_certificates": secrets["ca"], "client_cert": secrets["client_cert"],
                               "client_key": secrets["client_key"], "token": token(secrets)}) as server:
        yield server


def tls_context(secrets, client_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(secrets["ca"]))
    if client_certificate:
        context.load_cert_chain(secrets["client_cert"], secrets["client_key"])
    return context


def test_https_with_the_grpc_ports_certificate_mtls_and_api_keys(secure_server, secrets):
    from test_security import token

    port = http_port(secure_server)
    context = tls_context(secrets)
    bearer = {"Authorization": f"Bearer {token(secrets)}"}
    answer = call(port, "GET", "/v1/models", headers=bearer, context=context, host="localhost")
    assert answer.status == 200 and [m["name"] for m in answer.json()["models"]] == [OCR]
    # Keys: the same interceptor as gRPC, the same codes.
    answer = call(port, "GET", "/v1/models", context=context, host="localhost")
    assert answer.status == 401 and answer.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "authorization: Bearer" in answer.json()["message"]
    answer = call(port, "GET", "/v1/models", headers={"Authorization": "Bearer not-a-key-of-this-server"}, context=context,
                  host="localhost")
    assert answer.status == 401 and answer.json()["message"] == "invalid API key"
    answer = call(port, "GET", f"/v1/models/{NET}", headers={"Authorization": f"Bearer {KEY_OCR}"}, context=context, host="localhost")
    assert answer.status == 403 and answer.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    answer = call(port, "GET", f"/v1/models/{OCR}", headers={"Authorization": f"Bearer {KEY_OCR}"}, context=context, host="localhost")
    assert answer.status == 200
    codes = [e["code"] for e in secure_server.requests() if e.get("rpc") in ("ListModels", "GetModel")]
    assert {"UNAUTHENTICATED", "PERMISSION_DENIED", "OK"} <= set(codes), "logged and counted as gRPC calls are"
    # mTLS: no client certificate, no request; plaintext, no answer; static files are behind TLS too.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        call(port, "GET", "/v1/models", headers=bearer, context=tls_context(secrets, client_certificate=False), host="localhost")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
        call(port, "GET", "/colormap.json")
    assert call(port, "GET", "/colormap.json", context=context, host="localhost").status == 200
    assert "Traceback" not in secure_server.log_text()


# -- deadlines, disconnects, connections, the drain --------------------------------------------------------------
def test_a_client_that_goes_away_cancels_its_call(server, port):
    """A long Explain (about 20 s of work) whose client closes the connection after 1 s: the server
    logs it CANCELLED within seconds and its slot is free again."""
    request = explain_request(NET, image=png(256, 256, seed=5), depth=5, top_k=4, omit_maps=True)
    body = json.dumps(to_body(request)).encode()
    before = len(server.requests("Explain"))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /v1/models/{NET}:explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.0)
    sock.close()
    closed = time.monotonic()
    lb.wait_for(lambda: len(server.requests("Explain")) > before, 15, "the cancelled Explain logged")
    (entry,) = server.requests("Explain")[before:]
    assert entry["code"] == "CANCELLED" and time.monotonic() - closed < 15, entry
    lb.wait_for(lambda: any(e.get("event") == "http" and e.get("status") == 499 for e in server.log_entries()), 10, "499 logged")
    still_serving(port)


def test_connections_beyond_the_bound_get_503(server):
    gateway = HttpGateway(server.address, 2**20, max_connections=2)
    port = gateway.start("127.0.0.1", 0)
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.3)
        answer = raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"code":14' in answer and b"too many connections" in answer, answer
        idle.pop().close()
        lb.wait_for(lambda: call(port, "GET", "/v1/models", timeout=5).status == 200, 10, "a connection slot free again")
        for sock in idle:
            sock.close()
    finally:
        assert gateway.stop(2.0), "idle keep-alive connections do not hold the stop"


def test_sigterm_drains_http_calls_then_stops(tmp_path):
    """In-flight HTTP calls finish within the grace period, new ones get 503, then the port closes and
    the server exits 0."""
    with ServerProcess(["--model", NET, "--http-port", "0", "--max-concurrent", "1", "--grace-period", "60"]) as server:
        port = http_port(server)
        body = to_body(explain_request(NET, image=png(256, 256, seed=1), depth=4, top_k=5, omit_maps=True))
        results: list[Answer] = []

        def long_call():
            results.append(call(port, "POST", f"/v1/models/{NET}:explain", body))

        workers = [threading.Thread(target=long_call) for _ in range(3)]  # one runs, two wait for the slot
        for worker in workers:
            worker.start()
        lb.wait_for(lambda: "gap_in_flight_requests 3.0" in server.metrics_text(), 30, "three calls in flight")
        keep_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        keep_alive.request("GET", "/colormap.json")
        assert keep_alive.getresponse().read()
        server.terminate()
        lb.wait_for(lambda: any(e.get("event") == "draining" for e in server.log_entries()), 30, "draining")
        refused = call(port, "GET", "/v1/models", timeout=10)
        assert refused.status == 503 and refused.json()["code"] == 14 and refused.headers["Connection"] == "close"
        assert call(port, "GET", "/", timeout=10).status == 503, "static files too"
        for worker in workers:
            worker.join(120)
        assert [a.status for a in results] == [200] * 3 and all(len(a.json()["explanation"]["nodes"]) == 781 for a in results)
        assert server.wait(60) == 0
        stopped = [e for e in server.log_entries() if e.get("event") == "stopped"]
        assert stopped and stopped[-1]["clean"] is True
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        keep_alive.close()


# -- nginx in front of three replicas --------------------------------------------------------------------------------
HTTP_REPLICAS_BLOCK = re.compile(r"(?m)^([ \t]*)# BEGIN http replicas.*?\n.*?^[ \t]*# END http replicas[^\n]*\n", re.DOTALL)


def render_http_conf(upstreams: list[str], port: int, access_log: Path, upstream_options: str = "max_fails=1 fail_timeout=2s") -> str:
    """docker/nginx/gap-http.conf with its replicas block, listen address and access log replaced."""
    text = HTTP_CONF.read_text()
    assert HTTP_REPLICAS_BLOCK.search(text) and "\n    listen 8081;" in text and "access_log /dev/stdout gap_http;" in text

    def replicas(match: re.Match) -> str:
        return "".join(f"{match.group(1)}server {address} {upstream_options};\n" for address in upstreams)

    text = HTTP_REPLICAS_BLOCK.sub(replicas, text, count=1)
    text = text.replace("\n    listen 8081;", f"\n    listen {lb.LOOPBACK}:{port};")
    return text.replace("access_log /dev/stdout gap_http;", f"access_log {access_log} gap_http;")


class HttpNginx(lb.Nginx):
    """bench/lb.py's nginx (docker/nginx/gap-grpc.conf) with docker/nginx/gap-http.conf beside it."""

    def __init__(self, grpc_upstreams: list[str], http_upstreams: list[str], workdir: Path, binary: str | None = None) -> None:
        super().__init__(grpc_upstreams, workdir, binary=binary)
        self.http_upstreams = http_upstreams
        self.http_port = lb.free_port()
        self.http_access_log = self.workdir / "http-access.log"

    def write_config(self) -> None:
        super().write_config()
        (self.workdir / "gap-http.conf").write_text(render_http_conf(self.http_upstreams, self.http_port, self.http_access_log))

    def main_conf(self) -> str:
        grpc_include = f"    include {self.workdir}/gap-grpc.conf;\n"
        return super().main_conf().replace(grpc_include, grpc_include + f"    include {self.workdir}/gap-http.conf;\n")

    def http_entries(self) -> list[dict[str, str]]:
        text = self.http_access_log.read_text() if self.http_access_log.exists() else ""
        return [dict(re.findall(r"(\w+)=(\S*)", line), status=line.split('" ')[1].split()[0]) for line in text.splitlines()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    binary = nginx_or_skip()
    cluster = lb.Cluster(tmp_path_factory.mktemp("http-lb"), replicas=3, models=(OCR,), nginx=False,
                         env={"GAP_THREADS": "1", "GAP_HTTP_PORT": "0"}).start()
    try:
        http = [f"{lb.LOOPBACK}:{http_port(r)}" for r in cluster.replicas]
        cluster.nginx = HttpNginx([r.address for r in cluster.replicas], http, cluster.workdir / "nginx", binary=binary).start()
        yield cluster
    finally:
        cluster.stop()


def test_nginx_balances_the_http_api_and_expand_is_answered_by_any_replica(cluster):
    """Explain through nginx, then Expand of its level-1 nodes: answered by more than one replica (told
    apart by X-Gap-Replica and nginx's access log), each subtree identical to the tree's own."""
    nginx = cluster.nginx
    request = explain_request(OCR, image=png(200, 60, seed=3), depth=3, top_k=3)
    body = to_body(request)
    tree = call(nginx.http_port, "POST", f"/v1/models/{OCR}:explain", body)
    assert tree.status == 200 and tree.headers["X-Gap-Replica"]
    nodes = tree.json()["explanation"]["nodes"]
    replicas, subtrees = set(), []
    for node in [n for n in nodes if n["level"] == 1] * 2:
        expand = call(nginx.http_port, "POST", f"/v1/models/{OCR}:expand", {"request": body, "path": node["path"],
                                                                          "options": {}})
        assert expand.status == 400 and "no field named \"options\"" in expand.json()["message"], "the request's own fields only"
        expand = call(nginx.http_port, "POST", f"/v1/models/{OCR}:expand",
                      {"request": {**body, "options": {**body["options"], "depth": 2}}, "path": node["path"]})
        assert expand.status == 200, expand.body
        replicas.add(expand.headers["X-Gap-Replica"])
        subtree = expand.json()["explanation"]["nodes"]
        subtrees.append(subtree)
        # The subtree is the node's descendants in the full tree: same channels, scores and maps, by level.
        below = [n for n in nodes if n["path"][:1] == node["path"]]
        assert [(n["level"], n["path"], n["channel"], n["score"], n["map"]) for n in subtree] == \
               [(n["level"], n["path"], n["channel"], n["score"], n["map"]) for n in below]
    assert len(replicas) >= 2, f"Expand answered by one replica only: {replicas}"
    half = len(subtrees) // 2
    assert subtrees[:half] == subtrees[half:], "the same subtree whichever replica answers"
    served = {e["replica"] for e in nginx.http_entries() if e.get("replica", "-") != "-"}
    assert served >= replicas and len({e["upstream"] for e in nginx.http_entries()}) == 3
    explained = [r.requests("Expand").get("OK", 0) for r in cluster.replicas]
    assert sum(explained) == len(subtrees) and sum(1 for n in explained if n) >= 2, explained
    # The explorer page and the colour map come through the same port.
    assert call(nginx.http_port, "GET", "/colormap.json").status == 200


class SlowStream(http.server.BaseHTTPRequestHandler):
    """A stand-in replica whose stream sends a short line, pauses, then the rest (no X-Accel-Buffering header,
    so only nginx's own configuration decides whether the line waits for the rest)."""

    protocol_version = "HTTP/1.1"
    PAUSE = 2.0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in (b'{"result":{"level":0}}\n', b'{"result":{"level":1}}\n'):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            time.sleep(self.PAUSE)
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


def first_line_after(port: int, path: str) -> tuple[float, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.monotonic()
    connection.request("POST", path, b"{}", {"Content-Type": "application/json"})
    response = connection.getresponse()
    line = response.readline()
    elapsed = time.monotonic() - started
    response.read()
    connection.close()
    return elapsed, line


def test_nginx_passes_the_stream_on_unbuffered(cluster, tmp_path):
    """gap-http.conf passes a stream on as it comes (a stand-in replica that pauses after its first line:
    the line arrives before the pause ends); then a real stream through nginx arrives level by level."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowStream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        slow = HttpNginx([f"127.0.0.1:{lb.free_port()}"], [f"127.0.0.1:{upstream.server_address[1]}"], tmp_path,
                         binary=nginx_or_skip()).start()
        try:
            elapsed, line = first_line_after(slow.http_port, "/v1/models/m:explainStream")
            assert line == b'{"result":{"level":0}}\n' and elapsed < SlowStream.PAUSE / 2, elapsed
        finally:
            slow.stop()
    finally:
        upstream.shutdown()
    nginx = cluster.nginx
    replica = cluster.replicas[0]
    request = {"request": to_body(explain_request(OCR, tensor=np.random.RandomState(1).randn(1, 3, 48, 192).astype(np.float32),
                                                  depth=5, top_k=4, omit_maps=True))}
    connection = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=120)
    started = time.monotonic()
    connection.request("POST", f"/v1/models/{OCR}:explainStream", json.dumps(request), {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = json.loads(response.readline())
    first_at = time.monotonic() - started
    lines = [json.loads(line) for line in response.read().splitlines()]
    total = time.monotonic() - started
    connection.close()
    assert response.status == 200 and first["result"]["level"] == 0
    assert [line["result"]["level"] for line in lines] == [1, 2, 3, 4, 5, 5]
    assert first_at < total / 2, (first_at, total)
    assert replica.alive()


def test_nginx_answers_json_when_no_replica_is_reachable(tmp_path):
    nginx = HttpNginx([f"127.0.0.1:{lb.free_port()}"], [f"127.0.0.1:{lb.free_port()}"], tmp_path, binary=nginx_or_skip()).start()
    try:
        answer = call(nginx.http_port, "GET", "/v1/models", timeout=30)
        assert answer.status == 503 and answer.headers["Content-Type"] == "application/json"
        assert answer.json() == {"code": 14, "message": "no gap-service replica available", "details": []}
    finally:
        nginx.stop()


def test_nginx_https_with_mtls_to_the_replica(secure_server, secrets, tmp_path):
    """docker/nginx/gap-http.d/tls.conf, its paths and port moved here: HTTPS for the browser, HTTPS with
    nginx's client certificate to the replica's mTLS HTTP port; the key passes through."""
    from test_security import token

    port = lb.free_port()
    snippet = HTTP_TLS.read_text()
    files = {"tls.crt": secrets["tls_cert"], "tls.key": secrets["tls_key"], "ca.crt": secrets["ca"],
             "client.crt": secrets["client_cert"], "client.key": secrets["client_key"]}
    for name, path in files.items():
        snippet = snippet.replace(f"/run/secrets/gap-tls/{name};", f"{path};")
    assert "/run/secrets/" not in re.sub(r"(?m)^#.*$", "", snippet), "every secret of the snippet is replaced"
    (tmp_path / "gap-http.d").mkdir()
    (tmp_path / "gap-http.d" / "tls.conf").write_text(snippet.replace("listen 8444 ssl", f"listen 127.0.0.1:{port} ssl"))
    nginx = HttpNginx([secure_server.address], [f"127.0.0.1:{http_port(secure_server)}"], tmp_path, binary=nginx_or_skip())
    with nginx:
        context = ssl.create_default_context(cafile=str(secrets["ca"]))  # a browser: no client certificate
        answer = call(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {token(secrets)}"}, context=context,
                      host="localhost")
        assert answer.status == 200 and [m["name"] for m in answer.json()["models"]] == [OCR]
        answer = call(port, "GET", "/v1/models", context=context, host="localhost")
        assert answer.status == 401, "the replica checks the key nginx passed on"
    assert {e["upstream"] for e in nginx.http_entries()} == {f"127.0.0.1:{http_port(secure_server)}"}
