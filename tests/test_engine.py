"""The gAP engine against a straightforward torch-autograd reference of the method
(docs/method.md), one node at a time; plus batching, options and the CAM baselines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gap_service import Explainer
from gap_service.errors import CancelledError, GapError
from support.models import export_onnx, sample_input, torch_case
from support.reference import assert_same_tree, reference_tree, whole_graph
from support.torch_oracle import TorchGraph


@pytest.mark.parametrize("score", ["net", "positive"])
@pytest.mark.parametrize("name", ["resnet_bn", "mobilenetv3", "densenet", "nhwc", "vgg"])
def test_tree_equals_torch_reference(name: str, score: str) -> None:
    case = torch_case(name)
    data = export_onnx(case, 17)
    explainer = Explainer(data)
    x = sample_input(case)
    infos = explainer.layer_infos()[:3]
    explanation = explainer.explain(x, top_k=3, depth=len(infos), score=score)
    oracle = TorchGraph(onnx.load_from_string(data))
    logits, layers = explainer.decision().logits, [i.name for i in infos]
    seed = np.zeros(explainer.compiled().shape(logits))
    seed.reshape(-1)[explanation.target] = 1.0
    vjp, activations = whole_graph(oracle, {"input": x}, layers)
    expected = reference_tree(vjp, activations, logits, seed, explanation.target, layers, [i.channel_axis for i in infos],
                              3, score)
    assert_same_tree([(n.parent, n.level, n.layer, n.channel, n.score) for n in explanation.nodes], expected)


def test_cams_equal_their_definitions() -> None:
    case = torch_case("resnet_bn")
    data = export_onnx(case, 17)
    explainer = Explainer(data)
    x = sample_input(case)
    explanation = explainer.explain(x, top_k=2, depth=1)
    layer = explanation.layers[0]
    oracle = TorchGraph(onnx.load_from_string(data))
    seed = np.zeros((1, *explainer.compiled().shape(explanation.root.layer)))
    seed.reshape(1, -1)[0, explanation.target] = 1
    grad = torch.from_numpy(oracle.vjp({"input": x}, explanation.root.layer, layer, seed)[0][0])
    act = torch.from_numpy(oracle.run({"input": x}, [layer])[layer][0])
    gradcam = torch.relu((grad.mean(dim=(1, 2), keepdim=True) * act).sum(0)).numpy()
    layercam = torch.relu((torch.relu(grad) * act).sum(0)).numpy()
    for name, ref in (("gradcam", gradcam), ("layercam", layercam)):
        assert np.abs(explanation.cams[name] - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-12), name


@pytest.fixture(scope="module")
def resnet() -> tuple[Explainer, np.ndarray]:
    case = torch_case("resnet_bn")
    return Explainer(export_onnx(case, 17)), sample_input(case)


def _signature(explanation):
    return [(n.parent, n.layer, n.channel, round(n.score, 5)) for n in explanation.nodes]


def test_level_batching_and_memory_bound_do_not_change_the_tree(resnet) -> None:
    explainer, x = resnet
    batched = explainer.explain(x, top_k=4, depth=3)
    unbatched = explainer.explain(x, top_k=4, depth=3, seeds_per_run=1)
    tiny_bound = explainer.explain(x, top_k=4, depth=3, max_batch_bytes=1)
    assert _signature(batched) == _signature(unbatched) == _signature(tiny_bound)


def test_tree_shape_shares_and_pruning(resnet) -> None:
    explainer, x = resnet
    explanation = explainer.explain(x, top_k=3, depth=2)
    assert explanation.root.score == pytest.approx(float(explainer.forward(x, [explanation.root.layer])[explanation.root.layer].max()), rel=1e-6)
    for node in explanation.nodes[1:]:
        assert node.score > 0 and 0 < node.share <= 1
        assert node.map.shape == explainer.compiled().layer(node.layer).spatial_shape
        assert (node.map >= 0).all()
    for node in explanation.nodes:
        siblings = [explanation.nodes[c].score for c in node.children]
        assert siblings == sorted(siblings, reverse=True) and len(siblings) <= 3
    pruned = explainer.explain(x, top_k=3, depth=2, min_share=0.2)
    assert all(n.share >= 0.2 for n in pruned.nodes[1:])
    assert len(pruned.nodes) <= len(explanation.nodes)


def test_target_and_levels_stream_in_order(resnet) -> None:
    explainer, x = resnet
    seen: list[tuple[int, int]] = []
    explanation = explainer.explain(x, target=3, top_k=2, depth=3, on_level=lambda level, nodes, tree: seen.append((level, len(nodes))))
    assert explanation.target == 3
    assert [level for level, _ in seen] == [0, 1, 2, 3]
    assert sum(count for _, count in seen) == len(explanation.nodes)


def test_cancellation_stops_between_gradient_runs(resnet) -> None:
    explainer, x = resnet
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError):
        explainer.explain(x, top_k=2, depth=3, should_stop=stop)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"top_k": 0}, "top_k"), ({"top_k": 10**6}, "top_k"), ({"depth": 0}, "depth"), ({"depth": 99}, "depth"),
     ({"target": 10**6}, "target"), ({"target": -1}, "target"), ({"min_share": 1.5}, "min_share"),
     ({"score": "best"}, "score"), ({"layers": ["no_such_tensor"]}, "no_such_tensor")],
)
def test_bad_options_name_the_field(resnet, kwargs, field) -> None:
    explainer, x = resnet
    with pytest.raises(GapError) as info:
        explainer.explain(x, **kwargs)
    assert field in str(info.value)


def test_root_path_expands_one_node_like_the_full_tree(resnet) -> None:
    explainer, x = resnet
    full = explainer.explain(x, top_k=3, depth=3)
    node = full.level(2)[4]
    path = full.path(node.id)
    expanded = explainer.explain(x, top_k=3, depth=3, root_path=path)
    assert len(expanded.nodes) == len(path) + 1 + len(node.children)
    same = next(n for n in expanded.nodes if expanded.path(n.id) == path)
    assert [(expanded.nodes[c].channel, round(expanded.nodes[c].score, 6)) for c in same.children] == \
        [(full.nodes[c].channel, round(full.nodes[c].score, 6)) for c in node.children]
    with pytest.raises(GapError, match=r"path\[0\]: channel 9999"):
        explainer.explain(x, top_k=3, depth=3, root_path=[9999])


def test_ablate_zeroes_channels_and_measures_the_logit(resnet) -> None:
    explainer, x = resnet
    tree = explainer.explain(x, top_k=3, depth=1)
    layer = tree.layers[0]
    top = [n.channel for n in tree.level(1)]
    result = explainer.ablate(x, layer, top)
    assert result.before == pytest.approx(tree.logit, rel=1e-5)
    assert result.drop > 0 and result.channels == tuple(top)
    assert explainer.ablate(x, layer, []).drop == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(GapError, match="channels"):
        explainer.ablate(x, layer, [10**6])
