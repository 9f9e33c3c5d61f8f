"""Hostile model files (issue 12, findings 2, 3 and 9): each bad model is UNAVAILABLE with a reason
that names it and its file (ListModels, GetModel, the log, gap_model_ready), the good model beside
them is served, --strict exits listing every problem, the 6 KB ConstantOfShape bomb is refused
before anything is folded, and external data never leaves the model's version folder."""

from __future__ import annotations

import os

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gap_service.client import GapClient
from gap_service.errors import InvalidModelError
from gap_service.graph import loader
from gap_service.server.process import ServerProcess
from gap_service.wire import pb
from support.hostile import (GOOD_MODEL, TINY_CONFIG, Repository, constant_of_shape_bomb, cyclic_model, status_kb,
                             tiny_classifier, with_external_weights)

pytestmark = pytest.mark.timeout(240)

M = pb.model
GOOD_INPUT = np.zeros((1, 3, 48, 192), np.float32)


def _no_opset() -> onnx.ModelProto:
    model = tiny_classifier()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def _empty_graph() -> onnx.ModelProto:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [])
    return helper.make_model(graph)


def _outside_symlink(repo: Repository, name: str) -> None:
    secret = repo.root.parent / "secret.bin"
    secret.write_bytes(np.arange(108, dtype=np.float32).tobytes())  # the size of the conv weight: would load
    version = repo.add(name, with_external_weights("weights.bin"), TINY_CONFIG)
    (version / "weights.bin").symlink_to(secret)


def _dynamic(repo: Repository, name: str) -> None:
    model = tiny_classifier()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    repo.add(name, model, {"preprocessing": TINY_CONFIG["preprocessing"]})


# name -> (how the folder is made, a fragment of the reason). Every reason must also name the
# model and a path inside its folder.
CORPUS = {
    "text_file": (lambda r, n: r.add(n, b"this is not an ONNX model\n", TINY_CONFIG), "not a readable ONNX model"),
    "truncated": (lambda r, n: r.add(n, tiny_classifier().SerializeToString()[:150], TINY_CONFIG), "not a readable ONNX model"),
    "empty_graph": (lambda r, n: r.add(n, _empty_graph(), TINY_CONFIG), "empty graph"),
    "cyclic": (lambda r, n: r.add(n, cyclic_model(), TINY_CONFIG), "Cycle detected"),
    "bomb": (lambda r, n: r.add(n, constant_of_shape_bomb(), TINY_CONFIG), "limit of 256 MiB"),
    "no_opset": (lambda r, n: r.add(n, _no_opset(), TINY_CONFIG), "opset"),
    "dynamic_input": (_dynamic, "dynamic dims"),
    "no_config": (lambda r, n: r.add(n, tiny_classifier(), None), "missing config.json"),
    "bad_json": (lambda r, n: r.add(n, tiny_classifier(), "{not json"), "cannot read model config"),
    "config_list": (lambda r, n: r.add(n, tiny_classifier(), "[1, 2]"), "must be a JSON object"),
    "unknown_key": (lambda r, n: r.add(n, tiny_classifier(), {"colour": "red"}), "unknown config keys ['colour']"),
    "bad_preprocessing": (lambda r, n: r.add(n, tiny_classifier(), {"preprocessing": {"resize": "zoom"}}),
                          "preprocessing.resize"),
    "bad_types": (lambda r, n: r.add(n, tiny_classifier(), {"labels": "ab", "input_shape": [1, -3]}),
                  "'labels' must be a list of strings; 'input_shape' must be a list of positive integers"),
    "no_version": (lambda r, n: r.add(n, None, TINY_CONFIG), "no version folder"),
    "bad_default_version": (lambda r, n: r.add(n, tiny_classifier(), {**TINY_CONFIG, "default_version": 7}),
                            "default_version 7 is not among [1]"),
    "duplicate_name": (lambda r, n: r.add(n, tiny_classifier(), {**TINY_CONFIG, "name": GOOD_MODEL}), "is taken"),
    "external_symlink": (_outside_symlink, "symbolic link"),
    "external_dotdot": (lambda r, n: r.add(n, with_external_weights("../../secret.bin"), TINY_CONFIG), "'..'"),
    "external_absolute": (lambda r, n: r.add(n, with_external_weights("/etc/hostname"), TINY_CONFIG), "relative path"),
    "external_missing": (lambda r, n: r.add(n, with_external_weights("weights.bin"), TINY_CONFIG), "no such file"),
}


def build(root) -> Repository:
    repo = Repository(root)
    repo.copy_bundled(GOOD_MODEL)
    for name, (make, _) in CORPUS.items():
        make(repo, name)
    return repo


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hostile") / "models")


@pytest.fixture(scope="module")
def server(repository):
    with ServerProcess(["--model-repository", str(repository.root), "--max-concurrent", "1"]) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with GapClient(server.address, timeout=60) as client:
        yield client


def test_the_good_model_is_served_beside_the_bad_ones(client):
    assert client.health() == "SERVING"
    assert client.predict(GOOD_MODEL, tensor=GOOD_INPUT).classes


def test_every_bad_model_is_listed_with_a_reason_naming_it_and_its_file(client, repository):
    listed = {m.name: m for m in client.list_models()}
    assert listed[GOOD_MODEL].state == M.MODEL_STATE_READY and not listed[GOOD_MODEL].reason
    assert set(listed) == {GOOD_MODEL, *CORPUS}
    for name, (_, fragment) in CORPUS.items():
        summary = listed[name]
        assert summary.state == M.MODEL_STATE_UNAVAILABLE, name
        assert f"model '{name}'" in summary.reason and fragment in summary.reason, (name, summary.reason)
        assert str(repository.root / name) in summary.reason, (name, summary.reason)  # the file (or folder)
        assert "Traceback" not in summary.reason and "\n" not in summary.reason and len(summary.reason) < 1100


def test_get_model_and_requests_of_an_unavailable_model(client):
    response = client.get_model("text_file")
    assert response.model.state == M.MODEL_STATE_UNAVAILABLE and "not a readable ONNX model" in response.model.reason
    assert not response.inputs and response.limits.max_tree_nodes > 0
    for call in (lambda: client.predict("text_file", tensor=GOOD_INPUT),
                 lambda: client.explain("bomb", tensor=GOOD_INPUT, depth=1)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "unavailable" in error.value.details() and "model '" in error.value.details()
    assert client.get_model(GOOD_MODEL).model.state == M.MODEL_STATE_READY


def test_log_lines_and_the_ready_metric(server):
    logged = {e["model"]: e["reason"] for e in server.log_entries() if e.get("event") == "model unavailable"}
    assert set(logged) == set(CORPUS)
    text = server.metrics_text()
    assert f'gap_model_ready{{model="{GOOD_MODEL}"}} 1.0' in text
    for name in CORPUS:
        assert f'gap_model_ready{{model="{name}"}} 0.0' in text


def test_the_bomb_is_refused_at_load_with_peak_rss_under_1_gb(server):
    # The server loaded the 4 GiB ConstantOfShape file along with everything else, and served on.
    assert status_kb(server.process.pid, "VmHWM") < 1024 * 1024


def test_strict_exits_listing_every_problem(repository):
    with pytest.raises(RuntimeError, match="exited with 2") as error:
        ServerProcess(["--model-repository", str(repository.root), "--strict"], startup_timeout=60).start()
    message = str(error.value).splitlines()[-1]
    assert "--strict" in message and all(f"model '{name}'" in message for name in CORPUS), message


def test_a_repository_of_only_bad_models_does_not_start(tmp_path):
    repo = Repository(tmp_path / "models")
    for name in ("text_file", "bomb"):
        CORPUS[name][0](repo, name)
    with pytest.raises(RuntimeError, match="exited with 2") as error:
        ServerProcess(["--model-repository", str(repo.root)], startup_timeout=60).start()
    message = str(error.value).splitlines()[-1]
    assert "no model of the repository can be served" in message and "'text_file'" in message and "'bomb'" in message


# -- in process: the loader ---------------------------------------------------------------------
def test_the_bomb_is_refused_before_folding(monkeypatch):
    def fold(_model):
        raise AssertionError("folding was reached")

    monkeypatch.setattr(loader, "_fold_constants", fold)
    with pytest.raises(InvalidModelError, match=r"'bomb' \[1, 32768, 32768\] \(made by ConstantOfShape node 'bomb'\): 4096 MiB"):
        loader.normalize(constant_of_shape_bomb())


def test_external_data_inside_the_folder_loads(tmp_path):
    weights = np.random.RandomState(1).randn(4, 3, 3, 3).astype(np.float32)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.bin").write_bytes(b"\0" * 16 + weights.tobytes())
    model = with_external_weights("data/w.bin")
    model.graph.initializer[0].external_data.add(key="offset", value="16")
    onnx.save(model, tmp_path / "model.onnx")
    read = loader.read_model(tmp_path / "model.onnx")
    assert np.array_equal(onnx.numpy_helper.to_array(read.graph.initializer[0]), weights)


@pytest.mark.parametrize("location, setup, fragment", [
    ("w.bin", "symlink", "symbolic link"),
    ("sub/w.bin", "symlinked folder", "symbolic link"),
    ("w.bin", "hard link", "several hard links"),
    ("../w.bin", None, "'..'"),
    ("/etc/hostname", None, "relative path"),
    ("C:/x.bin", None, "relative path"),
    ("w.bin", "short file", "holds 100 bytes, but dims \\[4, 3, 3, 3\\] need 432"),
    ("w.bin", None, "no such file"),
])
def test_external_data_guard(tmp_path, location, setup, fragment):
    folder, outside = tmp_path / "1", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 432)  # exactly the weight's size: only the guard stops it
    if setup == "symlink":
        (folder / "w.bin").symlink_to(outside / "w.bin")
    elif setup == "symlinked folder":
        (folder / "sub").symlink_to(outside)
    elif setup == "hard link":
        os.link(outside / "w.bin", folder / "w.bin")
    elif setup == "short file":
        (folder / "w.bin").write_bytes(b"\0" * 100)
    onnx.save(with_external_weights(location), folder / "model.onnx")
    with pytest.raises(InvalidModelError, match=fragment):
        loader.read_model(folder / "model.onnx")


def test_external_data_needs_a_file(tmp_path):
    with pytest.raises(InvalidModelError, match="not read from a file"):
        loader.read_model(with_external_weights("w.bin").SerializeToString())
