"""Faithfulness check: does zeroing the channels gAP ranks highest hurt the decision most?

For a node (a decision with seed S on tensor T) and the next lower layer A: zero the top-m
channels of A by some ranking (through the segment model's channel mask) and measure the drop
of <S, T>. Rankings compared: gAP (net and positive contribution), mean activation, Grad-CAM
weight (mean gradient) and m random channels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .compiled import CompiledModel
from .engine import channel_first
from .methods import channel_scores, contribution, supporting_channels

RANKINGS = ("gap_net", "gap_positive", "activation", "gradcam", "random")


@dataclass(frozen=True)
class Ablation:
    """Decision value before and after zeroing ``channels`` of ``layer``."""

    layer: str
    channels: tuple[int, ...]
    before: float
    after: float

    @property
    def drop(self) -> float:
        return self.before - self.after

    @property
    def relative_drop(self) -> float:
        return self.drop / abs(self.before) if self.before else 0.0


def decision_value(compiled: CompiledModel, upper: str, lower: str, state: Mapping[str, np.ndarray],
                   seed: np.ndarray, channels: Sequence[int] = ()) -> float:
    """<seed, upper> with the given channels of ``lower`` zeroed."""
    mask = np.ones(compiled.layer(lower).channels, dtype=np.float32)
    mask[list(channels)] = 0.0
    output = compiled.run_segment(upper, lower, state, mask)
    return float((seed.astype(np.float64) * output).sum())


def ablate(compiled: CompiledModel, upper: str, lower: str, state: Mapping[str, np.ndarray],
           seed: np.ndarray, channels: Sequence[int]) -> Ablation:
    before = decision_value(compiled, upper, lower, state, seed)
    after = decision_value(compiled, upper, lower, state, seed, channels)
    return Ablation(lower, tuple(int(c) for c in channels), before, after)


def rank(method: str, grad: np.ndarray, activation: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Top-m channels by one ranking; grad and activation are [C, *spatial]."""
    if method == "gap_net":
        return supporting_channels(channel_scores(contribution(grad, activation), "net"), m)
    if method == "gap_positive":
        return supporting_channels(channel_scores(contribution(grad, activation), "positive"), m)
    if method == "activation":
        return np.argsort(-activation.mean(axis=(-2, -1)), kind="stable")[:m]
    if method == "gradcam":
        return np.argsort(-grad.mean(axis=(-2, -1)), kind="stable")[:m]
    if method == "random":
        return rng.choice(activation.shape[0], size=min(m, activation.shape[0]), replace=False)
    raise ValueError(f"unknown ranking '{method}'; known: {RANKINGS}")


@dataclass(frozen=True)
class NodeCase:
    """A decision to test: seed on ``upper`` and the layer ``lower`` it is decomposed into."""

    upper: str
    lower: str
    seed: np.ndarray


def node_cases(compiled: CompiledModel, state: Mapping[str, np.ndarray], target: int,
               layers: Sequence[str], children: int) -> Iterator[NodeCase]:
    """The root decision (logit -> layers[0]) and, if two layers are given, its top children
    (each a gAP node: channel k of layers[0] with its positive-contribution seed -> layers[1])."""
    logits = compiled.decision.logits
    root_seed = np.zeros(compiled.shape(logits), dtype=np.float32)
    root_seed.reshape(-1)[target] = 1.0
    yield NodeCase(logits, layers[0], root_seed)
    if len(layers) < 2 or children <= 0:
        return
    info = compiled.layer(layers[0])
    grad = compiled.run_vjp(logits, layers[0], state, root_seed[None])
    grad_cf = channel_first(grad, info.channel_axis)[0]
    act_cf = channel_first(state[layers[0]], info.channel_axis)
    contrib = contribution(grad_cf, act_cf)
    for channel in supporting_channels(channel_scores(contrib, "net"), children):
        seed = np.zeros(info.shape, dtype=np.float32)
        index: list[int | slice] = [0] + [slice(None)] * (len(info.shape) - 1)
        index[info.channel_axis] = int(channel)
        seed[tuple(index)] = np.where(contrib[channel] > 0, grad_cf[channel], 0)
        yield NodeCase(layers[0], layers[1], seed)


def evaluate_case(compiled: CompiledModel, state: Mapping[str, np.ndarray], case: NodeCase,
                  ms: Sequence[int], rng: np.random.Generator, random_draws: int = 3) -> dict[tuple[str, int], float]:
    """Relative drop of the case's decision for every (ranking, m)."""
    info = compiled.layer(case.lower)
    grad = channel_first(compiled.run_vjp(case.upper, case.lower, state, case.seed[None]), info.channel_axis)[0]
    activation = channel_first(state[case.lower], info.channel_axis)
    before = decision_value(compiled, case.upper, case.lower, state, case.seed)
    if before <= 0:
        return {}
    drops: dict[tuple[str, int], float] = {}
    for method in RANKINGS:
        for m in ms:
            draws = random_draws if method == "random" else 1
            values = []
            for _ in range(draws):
                channels = rank(method, grad, activation, m, rng)
                after = decision_value(compiled, case.upper, case.lower, state, case.seed, channels)
                values.append((before - after) / before)
            drops[(method, m)] = float(np.mean(values))
    return drops
