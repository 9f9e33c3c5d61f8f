"""CUDA code paths that run without a GPU: provider selection, the device-resident level runs
(IOBinding with the CPU device) and the float16 gradient graphs. bench/gpu_check.sh runs the
engine tests on a real GPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gap_service import Explainer
from gap_service.engine import channel_first
from gap_service.methods import channel_scores, contribution
from gap_service.runtime import CPU, CUDA, RuntimeConfig, cuda_provider_options, resolve_providers
from support.models import export_onnx, sample_input, torch_case


@pytest.fixture(scope="module")
def model() -> tuple[Explainer, np.ndarray]:
    case = torch_case("mobilenetv3")
    return Explainer(export_onnx(case, 17)), sample_input(case)


def test_cuda_options_are_chosen_on_purpose() -> None:
    options = cuda_provider_options(RuntimeConfig(gpu_mem_limit_bytes=2**30))
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["gpu_mem_limit"] == str(2**30)
    assert options["use_tf32"] == "0"


def test_cuda_request_falls_back_to_cpu_with_a_warning(caplog, monkeypatch) -> None:
    monkeypatch.setattr("gap_service.runtime.available_providers", lambda: [CPU])
    with caplog.at_level(logging.WARNING):
        providers = resolve_providers(RuntimeConfig(providers=(CUDA, CPU)))
    assert providers == [CPU]
    assert "CUDAExecutionProvider is not available" in caplog.text


def test_cuda_first_when_available(monkeypatch) -> None:
    monkeypatch.setattr("gap_service.runtime.available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr("gap_service.runtime._preload_cuda_libraries", lambda: None)
    providers = resolve_providers(RuntimeConfig())
    assert providers[0][0] == CUDA and providers[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert providers[-1] == CPU


def test_forward_device_matches_forward(model) -> None:
    explainer, x = model
    compiled = explainer.compiled()
    names = [info.name for info in compiled.layers] + [compiled.decision.logits]
    host = compiled.forward(explainer.feeds(x), names)
    device = compiled.forward_device(explainer.feeds(x), names)
    for name in names:
        assert device[name].device_name() == compiled.placement.device
        np.testing.assert_array_equal(device[name].numpy(), host[name])


def test_level_run_scores_and_selection_match_numpy(model) -> None:
    explainer, x = model
    compiled = explainer.compiled()
    upper, lower = compiled.layers[0].name, compiled.layers[1].name
    info = compiled.layer(lower)
    feeds = explainer.feeds(x)
    names = compiled.state_names(upper, lower)
    host_state = compiled.forward(feeds, names)
    device_state = compiled.forward_device(feeds, names)
    seeds = np.random.default_rng(0).standard_normal((5, *compiled.shape(upper))).astype(np.float32)
    grad, net, positive = compiled.run_level(upper, lower, device_state, compiled.placement.to_device(seeds))
    reference = compiled.run_vjp(upper, lower, host_state, seeds)
    np.testing.assert_allclose(grad.numpy(), reference, rtol=1e-6, atol=1e-7)
    contrib = contribution(channel_first(reference, info.channel_axis), channel_first(host_state[lower], info.channel_axis))
    np.testing.assert_allclose(net.numpy(), channel_scores(contrib, "net"), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(positive.numpy(), channel_scores(contrib, "positive"), rtol=1e-4, atol=1e-6)
    rows, channels = np.array([0, 3, 3]), np.array([1, 0, 7])
    maps, child_seeds = compiled.select(lower, grad, device_state[lower], rows, channels)
    for i, (row, channel) in enumerate(zip(rows, channels)):
        np.testing.assert_allclose(maps.numpy()[i], np.maximum(contrib[row, channel], 0), rtol=1e-6, atol=1e-7)
        expected = np.zeros(info.shape, np.float32)
        channel_first(expected[None], info.channel_axis)[0, channel] = np.where(
            contrib[row, channel] > 0, channel_first(reference, info.channel_axis)[row, channel], 0)
        np.testing.assert_allclose(child_seeds.numpy()[i], expected, rtol=1e-6, atol=1e-7)


def test_float16_gradient_graphs_track_float32(model) -> None:
    """Measured error of the float16 mode (CPU kernels here; CUDA in bench/gpu_check.sh)."""
    explainer, x = model
    full = explainer.explain(x, top_k=3, depth=2)
    half = explainer.explain(x, top_k=3, depth=2, precision="float16")
    assert [n.channel for n in half.level(1)] == [n.channel for n in full.level(1)]
    first = np.array([n.score for n in full.level(1)])
    assert np.abs(np.array([n.score for n in half.level(1)]) - first).max() <= 2e-2 * np.abs(first).max()


def test_nhwc_layers_on_the_device_path() -> None:
    case = torch_case("nhwc")
    explainer = Explainer(export_onnx(case, 17))
    x = sample_input(case)
    tree = explainer.explain(x, top_k=2, depth=2)
    assert all(n.map.shape == explainer.compiled().layer(n.layer).spatial_shape for n in tree.nodes[1:])
