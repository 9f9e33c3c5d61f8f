"""Gradients of torch-exported architectures equal torch autograd (issue: rewriter acceptance)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gap_service import Explainer
from gradcheck import LARGE_GRAPH_TOLERANCE, TOLERANCE, check_chain, relative_error
from support.models import TORCH_CASES, export_onnx, output_name, sample_input, torch_case
from support.torch_oracle import TorchGraph

FAST_CASES = [name for name in TORCH_CASES if name not in ("resnet18", "resnet50")]


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name", FAST_CASES)
def test_every_layer_pair_matches_autograd(name: str, opset: int) -> None:
    case = torch_case(name)
    data = export_onnx(case, opset)
    explainer = Explainer(data)
    oracle = TorchGraph(onnx.load_from_string(data))
    inputs = {"input": sample_input(case)}
    results = check_chain(explainer, oracle, inputs, sizes=(1, 7, 64))
    assert len(results) >= 3 * 2  # logits -> l1 and at least one layer pair, each with three P


def test_softmax_head_explains_logits_or_probabilities() -> None:
    case = torch_case("softmax_head")
    data = export_onnx(case, 17)
    logits = Explainer(data).decision()
    assert logits.logits != output_name(case) and logits.probabilities == output_name(case)
    probs = Explainer(data, explain_probability=True)
    assert probs.decision().logits == output_name(case)
    oracle = TorchGraph(onnx.load_from_string(data))
    check_chain(probs, oracle, {"input": sample_input(case)}, sizes=(1, 7), depth=2)


def test_nhwc_layers_have_channel_axis_3() -> None:
    case = torch_case("nhwc")
    explainer = Explainer(export_onnx(case, 17))
    infos = explainer.layer_infos()
    assert infos and all(info.channel_axis == 3 for info in infos), infos


def test_resnet_layer_gradients_match_the_torch_module_itself() -> None:
    """Independent of the ONNX interpreter: autograd on the original nn.Module via hooks."""
    case = torch_case("resnet_bn")
    explainer = Explainer(export_onnx(case, 17))
    x = sample_input(case)
    top = explainer.layers()[0]
    activation = explainer.forward(x, [top])[top]
    captured: dict[str, torch.Tensor] = {}
    # Find the module whose output is the top layer's activation, then cut the graph there.
    hooks = [m.register_forward_hook(lambda m, i, o, key=name: captured.__setitem__(key, o))
             for name, m in case.module.named_modules() if name]
    case.module(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    matches = [k for k, v in captured.items()
               if isinstance(v, torch.Tensor) and v.shape == activation.shape and np.allclose(v.detach().numpy(), activation, atol=1e-4)]
    assert matches, "no module output equals the top candidate layer"
    module_name = matches[-1]
    leaf = captured[module_name].detach().clone().requires_grad_()
    replaced: dict[str, torch.Tensor] = {}

    def substitute(module, inputs, output, key=module_name):
        replaced["done"] = leaf
        return leaf

    hook = dict(case.module.named_modules())[module_name].register_forward_hook(substitute)
    logits = case.module(torch.from_numpy(x))
    hook.remove()
    seeds = np.random.default_rng(1).standard_normal((7, *logits.shape)).astype(np.float32)
    reference = torch.stack([torch.autograd.grad(logits, leaf, torch.from_numpy(s), retain_graph=True)[0] for s in seeds])
    ours = explainer.vjp(x, explainer.decision().logits, top, seeds)
    assert relative_error(ours, reference.numpy()) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_full_size_resnets_per_segment(name: str) -> None:
    case = torch_case(name)
    data = export_onnx(case, 17)
    check_chain(Explainer(data), None, {"input": sample_input(case)}, sizes=(1, 7), tolerance=LARGE_GRAPH_TOLERANCE)
