"""The Node.js client (clients/node, @grpc/grpc-js with the same protos) against a real server."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_server import MODEL, SERVER_ARGS, sample_png, sample_tensor  # the same shared server

from gap_service.preprocess import decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.server.process import shared_server

pytestmark = pytest.mark.timeout(300)

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.fixture(scope="module")
def node_client():
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js client test")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        command = [npm, "ci" if (NODE_DIR / "package-lock.json").is_file() else "install", "--no-audit", "--no-fund"]
        result = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return node


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def test_node_client_calls_every_rpc(node_client, tmp_path):
    server = shared_server(SERVER_ARGS)
    tensor = sample_tensor()
    (tmp_path / "x.f32").write_bytes(tensor.astype("<f4").tobytes())
    png = sample_png()
    (tmp_path / "line.png").write_bytes(png)
    command = [node_client, str(NODE_DIR / "test" / "e2e.js"), "--server", server.address, "--model", MODEL,
               "--tensor", str(tmp_path / "x.f32"), "--shape", "1,3,48,192", "--image", str(tmp_path / "line.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-5000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    entry = load_repository(BUNDLED_REPOSITORY)[MODEL]
    explainer = entry.explainer()
    labels = list(entry.config.labels)
    assert out["health"] == "SERVING" and out["health_after"] == "SERVING" and MODEL in out["models"]
    assert out["model"]["inputs"] == [{"name": "x", "dtype": "DATA_TYPE_FLOAT32", "shape": [1, 3, 48, 192]}]
    compiled = explainer.compiled()
    assert out["model"]["layers"][: len(compiled.layers)] == [l.name for l in compiled.layers]
    logits = compiled.forward(explainer.feeds(tensor), [compiled.decision.logits])[compiled.decision.logits]
    assert out["predict"]["logits"] == [float(v) for v in logits.reshape(-1)]

    # Explain over gRPC from Node equals the in-process engine, maps bit for bit.
    local = explainer.explain(tensor, depth=3, top_k=3)
    remote = out["explain"]
    assert remote["target"] == local.target and remote["logit"] == local.logit
    assert remote["probability"] == local.probability and remote["layers"] == local.layers
    assert len(remote["nodes"]) == len(local.nodes)
    for r, n in zip(remote["nodes"], local.nodes):
        assert (r["id"], r["parent"], r["level"], r["layer"], r["channel"]) == (n.id, n.parent, n.level, n.layer, n.channel)
        assert r["score"] == n.score and r["share"] == n.share and r["children"] == n.children
        assert r["path"] == local.path(n.id) and r["map_shape"] == list(n.map.shape) and r["map_sha256"] == sha(n.map)
    assert out["stream"]["levels"] == [0, 1, 2, 3]
    assert [e["path"] for e in out["expand"]][0] == []

    picture_tensor, _ = preprocess(decode_image(png), entry.config.preprocessing)
    from_image = explainer.explain(picture_tensor, depth=2, top_k=2)
    assert out["image"]["target"] == from_image.target
    assert [r["map_sha256"] for r in out["image"]["nodes"]] == [sha(n.map) for n in from_image.nodes]
    assert out["image"]["picture_shape"] == [48, 192, 3] and out["image"]["heatmap_png"] == "PNG"
    assert out["errors"]["top_k"][0]["field"] == "options.top_k"

    # Several inputs per call (predictMany, explainMany, explainStream with inputs): each result is the
    # in-process engine's for that input, maps bit for bit.
    batch = out["batch"]
    inputs = [tensor, -tensor, picture_tensor]
    for logits, x in zip(batch["predict"], inputs):
        assert logits == [float(v) for v in compiled.forward(explainer.feeds(x), [compiled.decision.logits])[
            compiled.decision.logits].reshape(-1)]
    for remote_tree, x in zip(batch["trees"], inputs, strict=True):
        local_tree = explainer.explain(x, depth=3, top_k=3)
        assert remote_tree["target"] == local_tree.target
        assert [(r["layer"], r["channel"], r["score"], r["map_sha256"]) for r in remote_tree["nodes"]] == \
            [(n.layer, n.channel, n.score, sha(n.map)) for n in local_tree.nodes]
    assert batch["bad_input"] == ["inputs[1].tensor.data"] and batch["both"] == ["input", "inputs"]
