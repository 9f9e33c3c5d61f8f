"""``gap-service client ...`` against a real server: the same report as the local CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_server import MODEL, SERVER_ARGS, sample_png, sample_tensor  # the same shared server

from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.server.process import shared_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server():
    return shared_server(SERVER_ARGS)


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "gap_service.cli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_client_models_health_predict(server, tmp_path):
    assert cli("client", "health", "--server", server.address).stdout.strip() == "SERVING"
    assert MODEL in cli("client", "models", "--server", server.address).stdout
    info = json.loads(cli("client", "model", "--server", server.address, MODEL).stdout)
    assert info["model"]["name"] == MODEL and info["layers"]
    image = tmp_path / "line.png"
    image.write_bytes(sample_png())
    lines = cli("client", "predict", "--server", server.address, MODEL, str(image), "--top-k", "2").stdout.splitlines()
    assert len(lines) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_client_explain_writes_the_report(server, tmp_path, stream):
    array = tmp_path / "x.npy"
    np.save(array, sample_tensor())
    html, json_out = tmp_path / "r.html", tmp_path / "r.json"
    args = ["client", "explain", "--server", server.address, MODEL, str(array), "--depth", "2", "--top-k", "3",
            "--html", str(html), "--json", str(json_out)] + (["--stream"] if stream else [])
    result = cli(*args)
    assert "nodes in" in result.stdout and html.stat().st_size > 1000
    tree = json.loads(json_out.read_text())
    entry = load_repository(BUNDLED_REPOSITORY)[MODEL]
    local = entry.explainer().explain(sample_tensor(), depth=2, top_k=3)
    assert tree["nodes"] == local.to_dict()["nodes"]
    if stream:
        assert "level 2:" in result.stderr


def test_client_errors_are_reported(server, tmp_path):
    array = tmp_path / "x.npy"
    np.save(array, sample_tensor())
    result = cli("client", "explain", "--server", server.address, MODEL, str(array), "--top-k", "0", check=False)
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "options.top_k" in result.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_client_explain_of_several_inputs_writes_one_report_each(server, tmp_path, stream):
    """A folder and a file, --batch 2 per request: each tree the engine's; a bad input is reported by
    its path, and the rest of its request is sent again."""
    folder = tmp_path / "in"
    folder.mkdir()
    tensors = {name: sample_tensor(seed) for seed, name in enumerate(["a", "b", "c"])}
    for name, tensor in tensors.items():
        np.save(folder / f"{name}.npy", tensor)
    np.save(folder / "bad.npy", np.zeros((1, 3, 48, 100), np.float32))
    extra = tmp_path / "line.png"
    extra.write_bytes(sample_png())
    args = ["client", "explain", "--server", server.address, MODEL, str(folder), str(extra), "--depth", "2",
            "--top-k", "3", "--batch", "2", "--json", str(tmp_path / "json")] + (["--stream"] if stream else [])
    result = cli(*args, check=False)
    assert result.returncode == 2, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:4]] == [
        str(folder / "a.npy"), str(folder / "b.npy"), str(folder / "c.npy"), str(extra)]
    assert f"{folder / 'bad.npy'}: error: input.tensor.shape" in result.stderr
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == ["a.json", "b.json", "c.json", "line.json"]
    explainer = load_repository(BUNDLED_REPOSITORY)[MODEL].explainer()
    for name, tensor in tensors.items():
        tree = json.loads((tmp_path / "json" / f"{name}.json").read_text())
        assert tree["nodes"] == explainer.explain(tensor, depth=2, top_k=3).to_dict()["nodes"]


def test_client_predict_of_several_inputs(server, tmp_path):
    for seed in range(3):
        np.save(tmp_path / f"x{seed}.npy", sample_tensor(seed))
    lines = cli("client", "predict", "--server", server.address, MODEL, str(tmp_path), "--top-k", "1").stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / f"x{seed}.npy") for seed in range(3)]
