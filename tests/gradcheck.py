"""Shared assertions: our VJPs against the torch-autograd oracle."""

from __future__ import annotations

import numpy as np

from gap_service import Explainer
from gap_service.graph.segment import build_segment
from support.torch_oracle import TorchGraph

TOLERANCE = 1e-4
# Directional derivatives on large random networks: a ReLU input within float32 noise of zero
# may fall on the other side of the kink in the float64 oracle (seen: 1 unit in 500k), which
# moves the result by ~1e-3. Wrong rules give O(1) errors; tests/test_rules.py checks every
# rule exactly on small graphs.
PROJECTED_TOLERANCE = 1e-2


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """Max abs difference relative to the largest reference magnitude."""
    scale = float(np.abs(reference).max())
    return float(np.abs(ours - reference).max()) / max(scale, 1e-30)


def segment_oracle(explainer: Explainer, inputs: dict[str, np.ndarray], upper: str, lower: str):
    """The oracle on the model cut between lower and upper, fed our forward state.

    In deep random networks a few ReLU inputs sit within float32 noise of zero; evaluating the
    whole model in torch flips some of those masks and the two gradients then differ at those
    units for reasons unrelated to the rules. Cutting at ``lower`` and feeding the same float32
    activations (evaluated in float64 by torch) removes that noise.
    """
    compiled = explainer.compiled({k: v.shape for k, v in inputs.items()})
    names = compiled.state_names(upper, lower)
    state = compiled.forward(inputs, names)
    oracle = TorchGraph(build_segment(compiled.nm, upper, lower))
    return oracle, {name: state[name] for name in names}


def projected_error(ours: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> float:
    """Relative error of <g_p, v> over seeds p, for a random direction v.

    Large random networks put a few ReLU inputs within float32 noise of zero, and a mask that
    flips there changes a whole receptive field of the gradient: element-wise comparison then
    measures float32 noise at kinks, not the rules. Directional derivatives (what finite
    differences measure too) average that out while any wrong rule still shows.
    """
    direction = rng.standard_normal(ours.shape[1:])
    ours_dir = (ours.astype(np.float64) * direction).reshape(len(ours), -1).sum(axis=1)
    reference_dir = (reference * direction).reshape(len(reference), -1).sum(axis=1)
    scale = float(np.abs(reference_dir).max())
    return float(np.abs(ours_dir - reference_dir).max()) / max(scale, 1e-30)


def check_chain(explainer: Explainer, oracle: TorchGraph | None, inputs: dict[str, np.ndarray], sizes=(1, 7, 64),
                seed: int = 0, depth: int | None = None, projected: bool = False) -> list[tuple[str, str, int, float]]:
    """VJPs for logits -> l1 and every consecutive pair of candidate layers, for each seed count.

    ``oracle=None`` uses a segment oracle per pair (see ``segment_oracle``); ``projected``
    compares directional derivatives (see ``projected_error``) instead of every element.
    """
    compiled = explainer.compiled({k: v.shape for k, v in inputs.items()})
    chain = [compiled.decision.logits, *[info.name for info in compiled.layers]]
    if depth is not None:
        chain = chain[: depth + 1]
    rng = np.random.default_rng(seed)
    results = []
    for upper, lower in zip(chain[:-1], chain[1:]):
        pair_oracle, oracle_inputs = (oracle, inputs) if oracle is not None else segment_oracle(explainer, inputs, upper, lower)
        for count in sizes:
            seeds = rng.standard_normal((count, *compiled.shape(upper))).astype(np.float32)
            ours = explainer.vjp(inputs, upper, lower, seeds)
            reference = pair_oracle.vjp(oracle_inputs, upper, lower, seeds.astype(np.float64))
            assert ours.shape == reference.shape, (upper, lower, ours.shape, reference.shape)
            error = projected_error(ours, reference, rng) if projected else relative_error(ours, reference)
            results.append((upper, lower, count, error))
            limit = PROJECTED_TOLERANCE if projected else TOLERANCE
            assert error < limit, f"{lower} <- {upper} with P={count}: relative error {error:.2e}"
    return results
