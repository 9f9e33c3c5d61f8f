"""A model specialised to one set of input shapes, with its onnxruntime sessions.

Everything here is built once and reused: the normalised graph, its decision and layers, the
forward "tap" session that returns every requested activation in one run, and one VJP session
per (upper, lower) pair. Building is guarded by a lock; running sessions is thread-safe.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InvalidInputError
from .graph.gradient import SEED, VJP, VjpGraph, build_vjp_graph
from .graph.layers import Decision, LayerInfo, candidate_layers, find_decision, layer_info
from .graph.loader import NormalizedModel
from .graph.segment import MASK, build_segment
from .levels import (CHANNELS, CHILD_SEEDS, MAPS, ROWS, SCORES_NET, SCORES_POSITIVE, Placement,
                     build_level_graph, build_selection_graph, placement_for, run_bound, to_float16)
from .runtime import RuntimeConfig, make_session

log = logging.getLogger(__name__)


class CompiledModel:
    """Normalised graph + sessions for fixed input shapes."""

    def __init__(self, nm: NormalizedModel, runtime: RuntimeConfig, output: str | None, explain_probability: bool) -> None:
        self.nm = nm
        self.runtime = runtime
        self._graph = nm.graph()
        self._output = output
        self._explain_probability = explain_probability
        self._lock = threading.Lock()
        self._tap_outputs: frozenset[str] = frozenset()
        self._tap_session: ort.InferenceSession | None = None
        self._vjp: dict[tuple[str, str], tuple[VjpGraph, ort.InferenceSession]] = {}
        self._segments: dict[tuple[str, str, bool], ort.InferenceSession] = {}
        self._levels: dict[tuple[str, str, str], ort.InferenceSession] = {}
        self._selections: dict[tuple[str, bool], ort.InferenceSession] = {}
        self._layer_infos: dict[str, LayerInfo] = {}

    @functools.cached_property
    def decision(self) -> Decision:
        return find_decision(self._graph, self.nm, self._output, self._explain_probability)

    @functools.cached_property
    def layers(self) -> list[LayerInfo]:
        """Default decomposition layers (discovered on first use: plain VJPs do not need them)."""
        layers = candidate_layers(self._graph, self.nm, self.decision)
        self._layer_infos.update({info.name: info for info in layers})
        # Tap every default layer and the decision at once, so the forward session (which holds
        # all weights) is built once; an explicitly chosen extra tensor rebuilds it with the union.
        self._tap_outputs = self._tap_outputs | {info.name for info in layers} | {self.decision.logits} | (
            {self.decision.probabilities} if self.decision.probabilities else set()
        )
        return layers

    # -- description --------------------------------------------------------------------------
    def layer(self, name: str) -> LayerInfo:
        info = self._layer_infos.get(name)
        if info is None:
            with self._lock:
                info = self._layer_infos[name] = layer_info(self._graph, self.nm, name)
        return info

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layer(name).shape if name not in self.nm.shapes else tuple(self.nm.shapes[name])

    @property
    def providers(self) -> list[str]:
        session = self._tap_session
        return session.get_providers() if session is not None else []

    # -- running --------------------------------------------------------------------------------
    def forward(self, feeds: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
        """Activations of ``names`` for these inputs, all from one forward run."""
        wanted = list(dict.fromkeys(names))
        computed = [n for n in wanted if n not in feeds]
        values = dict(zip(computed, self._session_for(computed).run(computed, dict(feeds)))) if computed else {}
        return {n: feeds[n] if n in feeds else values[n] for n in wanted}

    def vjp_graph(self, upper: str, lower: str) -> tuple[VjpGraph, ort.InferenceSession]:
        key = (upper, lower)
        cached = self._vjp.get(key)
        if cached is None:
            with self._lock:
                cached = self._vjp.get(key)
                if cached is None:
                    graph = build_vjp_graph(self.nm, upper, lower)
                    session = make_session(graph.model, self.runtime, f"gradient graph {lower} <- {upper}")
                    cached = self._vjp[key] = (graph, session)
        return cached

    def path_elements(self, upper: str, lower: str) -> int:
        """Elements of all forward tensors on the path from ``lower`` to ``upper`` (a per-seed memory estimate)."""
        graph, _ = self.vjp_graph(upper, lower)
        return graph.path_elements

    def run_vjp(self, upper: str, lower: str, state: Mapping[str, np.ndarray], seeds: np.ndarray) -> np.ndarray:
        """VJPs for a seed batch [P, *shape(upper)] given forward ``state`` (lower + side inputs)."""
        graph, session = self.vjp_graph(upper, lower)
        feeds = {name: state[name] for name in (graph.lower, *graph.side_inputs)}
        feeds[SEED] = np.ascontiguousarray(seeds, dtype=np.float32)
        return session.run([VJP], feeds)[0]

    def run_segment(
        self, upper: str, lower: str, state: Mapping[str, np.ndarray], mask: np.ndarray | None = None
    ) -> np.ndarray:
        """``upper`` recomputed from ``lower`` (and side inputs) in ``state``; ``mask`` scales channels."""
        key = (upper, lower, mask is not None)
        session = self._segments.get(key)
        if session is None:
            with self._lock:
                session = self._segments.get(key)
                if session is None:
                    axis = self.layer(lower).channel_axis if mask is not None else None
                    model = build_segment(self.nm, upper, lower, axis)
                    session = self._segments[key] = make_session(model, self.runtime, f"segment {lower} -> {upper}")
        graph, _ = self.vjp_graph(upper, lower)
        feeds = {name: state[name] for name in (lower, *graph.side_inputs)}
        if mask is not None:
            feeds[MASK] = np.asarray(mask, dtype=np.float32)
        return session.run([upper], feeds)[0]

    # -- device-resident runs (see levels.py) ------------------------------------------------------
    @property
    def placement(self) -> Placement:
        """Where this model's OrtValues live: the first provider of the forward session."""
        return placement_for(self._session_for([]))

    def forward_device(self, feeds: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, ort.OrtValue]:
        """Like ``forward``, but the activations stay on the execution device."""
        wanted = list(dict.fromkeys(names))
        placement = self.placement
        computed = [n for n in wanted if n not in feeds]
        session = self._session_for(computed)
        values = dict(zip(computed, run_bound(session, placement, dict(feeds), computed))) if computed else {}
        return {n: placement.to_device(feeds[n]) if n in feeds else values[n] for n in wanted}

    def run_level(self, upper: str, lower: str, state: Mapping[str, ort.OrtValue], seeds: ort.OrtValue,
                  precision: str = "float32") -> tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]:
        """(G, net scores [P, C], positive scores [P, C]) for device seeds [P, *shape(upper)]."""
        session = self._level_session(upper, lower, precision)
        graph, _ = self.vjp_graph(upper, lower)
        inputs: dict[str, ort.OrtValue | np.ndarray] = {name: state[name] for name in (graph.lower, *graph.side_inputs)}
        inputs[SEED] = seeds
        grad, net, positive = run_bound(session, self.placement, inputs, [VJP, SCORES_NET, SCORES_POSITIVE])
        return grad, net, positive

    def select(self, lower: str, grad: ort.OrtValue, activation: ort.OrtValue, rows: np.ndarray,
               channels: np.ndarray, with_seeds: bool = True) -> tuple[ort.OrtValue, ort.OrtValue | None]:
        """(maps [n, *spatial], child seeds [n, *shape(lower)] or None) of the chosen (row, channel) pairs."""
        key = (lower, with_seeds)
        session = self._selections.get(key)
        if session is None:
            with self._lock:
                session = self._selections.get(key)
                if session is None:
                    info = self.layer(lower)
                    model = build_selection_graph(info.shape, info.channel_axis, with_seeds)
                    session = self._selections[key] = make_session(model, self.runtime, f"selection graph of {lower}")
        inputs = {VJP: grad, "gap_activation": activation, ROWS: rows.astype(np.int64), CHANNELS: channels.astype(np.int64)}
        outputs = run_bound(session, self.placement, inputs, [MAPS, CHILD_SEEDS] if with_seeds else [MAPS])
        return outputs[0], (outputs[1] if with_seeds else None)

    def _level_session(self, upper: str, lower: str, precision: str) -> ort.InferenceSession:
        key = (upper, lower, precision)
        session = self._levels.get(key)
        if session is None:
            graph, _ = self.vjp_graph(upper, lower)
            with self._lock:
                session = self._levels.get(key)
                if session is None:
                    model = build_level_graph(graph, self.layer(lower).channel_axis)
                    if precision == "float16":
                        model = to_float16(model)
                    session = self._levels[key] = make_session(model, self.runtime, f"{precision} level graph {lower} <- {upper}")
        return session

    def state_names(self, upper: str, lower: str) -> tuple[str, ...]:
        """Forward tensors a VJP run needs."""
        graph, _ = self.vjp_graph(upper, lower)
        return (graph.lower, *graph.side_inputs)

    def _session_for(self, names: Sequence[str]) -> ort.InferenceSession:
        if not set(names) <= self._tap_outputs or self._tap_session is None:
            with self._lock:
                if not set(names) <= self._tap_outputs or self._tap_session is None:
                    log.info("building the forward session of %s with %d taps", self.nm.model.graph.name, len(self._tap_outputs | set(names)))
                    outputs = self._tap_outputs | set(names)
                    self._tap_session = make_session(self._tap_model(outputs), self.runtime, "forward model")
                    self._tap_outputs = frozenset(outputs)
        assert self._tap_session is not None
        return self._tap_session

    def _tap_model(self, names: Iterable[str]) -> onnx.ModelProto:
        """The model with the given tensors as outputs (activation taps)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.nm.model)
        del model.graph.output[:]
        for name in sorted(names):
            if name not in self.nm.shapes:
                raise InvalidInputError(f"tensor '{name}' is not in the model")
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.nm.dtypes[name]))
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, list(self.nm.shapes[name])))
        return model
