"""The gAP tree computed the plain way (docs/method.md), one torch-autograd VJP per node: the
reference the engine's trees are held to, for any root <seed, tensor>.

The VJPs come from the torch oracle on the whole graph (``whole_graph``), or, for large
third-party graphs, on the segment between each pair of layers fed the engine's own float32
forward state in float64 (``segments``, as tests/gradcheck.py checks their gradients): a ReLU input
within float32 noise of zero can fall on the other side in a float64 forward run of the whole
graph, which has nothing to do with the method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from gap_service.graph.segment import segment_model
from support.torch_oracle import TorchGraph

# (upper, lower, seeds [P, *shape(upper)]) -> [P, *shape(lower)]
Vjp = Callable[[str, str, np.ndarray], np.ndarray]
Node = tuple[int | None, int, str, int, float]  # parent, level, layer, channel, score


def channel_first(values: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(values[0], axis - 1, 0)


def reference_tree(vjp: Vjp, activations: Mapping[str, np.ndarray], root: str, root_seed: np.ndarray, root_channel: int,
                   layers: list[str], axes: list[int], top_k: int, score: str) -> list[Node]:
    """(parent, level, layer, channel, score) per node, in the engine's breadth-first order."""
    nodes: list[Node] = [(None, 0, root, root_channel, 0.0)]
    frontier = [(0, np.asarray(root_seed, np.float64))]
    chain = [root, *layers]
    for level, (upper, lower) in enumerate(zip(chain[:-1], chain[1:]), start=1):
        axis = axes[level - 1]
        activation = channel_first(activations[lower], axis)
        next_frontier = []
        for node_id, seed in frontier:
            grad = channel_first(vjp(upper, lower, seed[None])[0], axis)
            contrib = grad * activation
            scores = contrib.sum(axis=(1, 2)) if score == "net" else np.maximum(contrib, 0).sum(axis=(1, 2))
            order = sorted((c for c in range(len(scores)) if scores[c] > 0), key=lambda c: (-scores[c], c))[:top_k]
            for channel in order:
                nodes.append((node_id, level, lower, channel, float(scores[channel])))
                child_seed = np.zeros(activations[lower].shape)
                view = np.moveaxis(child_seed[0], axis - 1, 0)
                view[channel] = np.where(contrib[channel] > 0, grad[channel], 0)
                next_frontier.append((len(nodes) - 1, child_seed))
        frontier = next_frontier
    return nodes


def whole_graph(oracle: TorchGraph, feeds: Mapping[str, np.ndarray], layers: list[str]) -> tuple[Vjp, dict[str, np.ndarray]]:
    """VJPs and activations of the oracle run on the whole graph from the inputs."""
    def vjp(upper: str, lower: str, seeds: np.ndarray) -> np.ndarray:
        return oracle.vjp(dict(feeds), upper, lower, seeds)

    return vjp, oracle.run(dict(feeds), layers)


def segments(compiled, feeds: Mapping[str, np.ndarray], chain: list[str]) -> tuple[Vjp, dict[str, np.ndarray]]:
    """VJPs of the oracle on each pair's segment, fed the compiled model's own forward state."""
    pairs = list(zip(chain[:-1], chain[1:]))
    names = sorted({name for upper, lower in pairs for name in compiled.state_names(upper, lower)})
    state = compiled.forward(dict(feeds), names)
    oracles = {(upper, lower): TorchGraph(segment_model(compiled.nm, compiled.cone(upper, lower))) for upper, lower in pairs}

    def vjp(upper: str, lower: str, seeds: np.ndarray) -> np.ndarray:
        cone_state = {name: state[name] for name in compiled.state_names(upper, lower)}
        return oracles[(upper, lower)].vjp(cone_state, upper, lower, seeds)

    return vjp, state


def assert_same_tree(got: list[Node], expected: list[Node], tolerance: float = 1e-4) -> float:
    """Same nodes (parent, level, layer, channel); scores within ``tolerance`` of each level's
    largest; returns the largest relative score error seen."""
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    worst = 0.0
    for level in sorted({g[1] for g in got} - {0}):
        ours = np.array([g[4] for g in got if g[1] == level])
        ref = np.array([e[4] for e in expected if e[1] == level])
        error = float(np.abs(ours - ref).max() / np.abs(ref).max())
        assert error <= tolerance, f"level {level}: relative score error {error:.2e}"
        worst = max(worst, error)
    return worst
