"""Shared assertions: our VJPs against the torch-autograd oracle."""

from __future__ import annotations

import numpy as np

from gap_service import Explainer
from gap_service.graph.segment import segment_model
from support.torch_oracle import TorchGraph

TOLERANCE = 1e-4
# Large random-weight graphs, compared per segment: a ReLU input within float32 noise of zero
# can fall on the other side of the kink in the float64 oracle (seen: 1 unit in 500k flips a
# whole receptive field of the gradient, ~5e-3), and onnxruntime's fast Sigmoid/Exp are
# accurate in absolute, not relative, terms deep in saturation (seen: 8e-3 on ppocr_det, whose
# random-input outputs sit near 1e-6). Seen at most 6.4e-2 (torch ResNet-18, stage 1 -> stage 0,
# P=7: 0.2% of the elements off by more than 1e-3, median error 2e-8; zoo ResNet-50: 3.4e-2,
# confined to one blob of the map). A wrong rule gives errors of order 1 everywhere, so large
# graphs must also match exactly at the median element; tests/test_rules.py holds every rule to
# TOLERANCE.
LARGE_GRAPH_TOLERANCE = 1e-1
MEDIAN_TOLERANCE = 1e-5


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
    oracle = TorchGraph(segment_model(compiled.nm, compiled.cone(upper, lower)))
    return oracle, {name: state[name] for name in names}


def check_chain(explainer: Explainer, oracle: TorchGraph | None, inputs: dict[str, np.ndarray], sizes=(1, 7, 64),
                seed: int = 0, depth: int | None = None, tolerance: float = TOLERANCE) -> list[tuple[str, str, int, float]]:
    """VJPs for logits -> l1 and every consecutive pair of candidate layers, for each seed count.

    ``oracle=None`` uses a segment oracle per pair (see ``segment_oracle``).
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
            error = relative_error(ours, reference)
            results.append((upper, lower, count, error))
            assert error < tolerance, f"{lower} <- {upper} with P={count}: relative error {error:.2e}"
            if tolerance > TOLERANCE:
                median = float(np.median(np.abs(ours - reference))) / float(np.abs(reference).max())
                assert median < MEDIAN_TOLERANCE, f"{lower} <- {upper} with P={count}: median error {median:.2e}"
    return results
