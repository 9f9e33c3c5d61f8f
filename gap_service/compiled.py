"""A model specialised to one set of input shapes, with its onnxruntime sessions.

The normalised model is imported into graph-surgeon once; every graph this module runs is cut
from that one import (graph/cone.py). Everything is built on first use and reused: the decision
and layers, the cone of each (upper, lower) pair (cheap: what a run reads, without building
anything), and one session per graph that actually runs: the forward "tap" session returning
every activation an explanation reads in one run, and per pair the VJP, level or segment graph
that is asked for. Building is thread-safe (cache.py); running sessions is too.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from . import runtime
from .cache import BuildOnce
from .errors import InvalidInputError, InvalidModelError
from .graph.cone import Cone, find_cone
from .graph.gradient import SEED, VJP, vjp_model
from .graph.layers import (
    Decision,
    LayerInfo,
    branch_layers,
    candidate_layers,
    channel_axes,
    feature_maps,
    find_decision,
    layer_info,
    require_layers,
    seeded_layer,
)
from .graph.loader import NormalizedModel
from .graph.segment import MASK, segment_model
from .graph.stack import stack, stackable, stacked_name
from .levels import (
    CHANNELS,
    CHILD_SEEDS,
    MAPS,
    ROWS,
    SCORES_NET,
    SCORES_POSITIVE,
    Placement,
    level_model,
    placement_for,
    run_bound,
    selection_session,
    to_float16,
)
from .runtime import RuntimeConfig
from .state_cache import model_token
from .targets import Task, class_support, detect_layout

log = logging.getLogger(__name__)

# Most inputs one stacked run serves; stacks come in powers of two, so each graph has at most
# four stacked sessions (each holds the graph's weights once).
MAX_STACK = 8

T = TypeVar("T")


def _stack_parts(items: Sequence[T], largest: int = MAX_STACK) -> list[Sequence[T]]:
    """``items`` in runs of ``largest``, then 4, 2 and 1 (largest first)."""
    parts, start = [], 0
    while start < len(items):
        size = next(size for size in (largest, 4, 2, 1) if size <= min(len(items) - start, largest))
        parts.append(items[start : start + size])
        start += size
    return parts


class CompiledModel:
    """Normalised graph + sessions for fixed input shapes."""

    def __init__(self, nm: NormalizedModel, runtime_config: RuntimeConfig, output: str | None, explain_probability: bool,
                 task: Task | None = None) -> None:
        self._declared_task = task
        self.token = model_token()  # names this compiled model in the forward-state cache
        # A multi-head detector's score outputs, joined into one tensor that a spread seed can lie on.
        heads = task.detection.heads if task is not None and task.detection is not None else ()
        self._joined_parts = tuple(head.scores for head in heads) if len(heads) > 1 else ()
        self.joined = "+".join(self._joined_parts) if self._joined_parts else None
        self.nm = _join(nm, self._joined_parts, self.joined) if self.joined else nm
        self.runtime = runtime_config
        self._graph = self.nm.graph()  # the one graph-surgeon import: read by every pass, never changed
        self._output = output
        self._explain_probability = explain_probability
        self._cones: BuildOnce[tuple[str, str], Cone] = BuildOnce()
        self._layer_infos: BuildOnce[str, LayerInfo] = BuildOnce()
        self._chains: BuildOnce[str, list[LayerInfo]] = BuildOnce()
        self._decisions: BuildOnce[str, Decision] = BuildOnce()
        self._branch_taps: BuildOnce[int | None, frozenset[str]] = BuildOnce()
        self._sessions: BuildOnce[tuple[str, ...], ort.InferenceSession] = BuildOnce()
        self._forward_lock = threading.Lock()
        self._forward: tuple[frozenset[str], ort.InferenceSession] | None = None

    # -- description --------------------------------------------------------------------------
    @property
    def decision(self) -> Decision:
        return self.decision_of(self._output)

    def decision_of(self, output: str | None) -> Decision:
        """The decision tensor of a graph output (its logits, where a softmax or sigmoid ends it);
        None: the model's decision output (the first graph output, or the one configured)."""
        return self._decisions.get(output or "", lambda: find_decision(self._graph, self.nm, output, self._explain_probability))

    @functools.cached_property
    def _channel_axes(self) -> dict[str, int]:
        return channel_axes(self._graph, self.nm)

    @functools.cached_property
    def task(self) -> Task | None:
        """The declared task, else a detection task where the outputs are an unambiguous YOLO head."""
        if self._declared_task is not None:
            return self._declared_task
        layout = detect_layout({name: self.shape(name) for name in self.nm.outputs}, self.input_hw)
        return Task("detection", layout, declared=False) if layout is not None else None

    @functools.cached_property
    def input_hw(self) -> tuple[int, int]:
        """Height and width of the (first) image input, from its layout."""
        name, shape = next(iter(self.nm.inputs.items()))
        if len(shape) != 4:
            return (1, 1)
        axis = self.layer(name).channel_axis if name in self.nm.shapes else 1
        spatial = [d for index, d in enumerate(shape) if index not in (0, axis)]
        return int(spatial[0]), int(spatial[1])

    @functools.cached_property
    def _maps(self) -> dict[str, LayerInfo]:
        return feature_maps(self._graph, self.nm, self._channel_axes)

    @property
    def _default_layers(self) -> list[LayerInfo]:
        return self.chain(self.decision.logits)

    def chain(self, top: str) -> list[LayerInfo]:
        """The candidate layers below tensor ``top``, highest first (graph/layers.py)."""
        return self._chains.get(top, lambda: candidate_layers(self._graph, self._maps, top))

    @property
    def layers(self) -> list[LayerInfo]:
        """Default decomposition layers, highest first (an error for a model without feature maps)."""
        return require_layers(self._default_layers, self.decision)

    def layer(self, name: str) -> LayerInfo:
        default = next((info for info in self._default_layers if info.name == name), None)
        return default or self._layer_infos.get(name, lambda: layer_info(self._graph, self.nm, name, self._channel_axes))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layer(name).shape if name not in self.nm.shapes else tuple(self.nm.shapes[name])

    def cone(self, upper: str, lower: str) -> Cone:
        """The forward cone of a pair: its nodes, side inputs and size (no graph is built)."""
        return self._cones.get((upper, lower), lambda: find_cone(self._graph, self.nm, upper, lower))

    def state_names(self, upper: str, lower: str) -> tuple[str, ...]:
        """Forward tensors a VJP, level or segment run of the pair reads."""
        return self.cone(upper, lower).state_names

    def path_elements(self, upper: str, lower: str) -> int:
        """Elements of all forward tensors on the path from ``lower`` to ``upper`` (a per-seed memory estimate)."""
        return self.cone(upper, lower).path_elements

    def seeded_layers(self, root: str, seed: np.ndarray) -> list[LayerInfo]:
        """The candidate layers for a seed on ``root``: the map all of its support flows through,
        then the chain below that map."""
        first = seeded_layer(self._graph, self.nm, self._maps, root, seed != 0)
        if first is None:
            raise InvalidModelError(f"no 4-D feature map (batch 1, spatial size > 1, two or more channels) carries "
                                    f"the seed on '{root}' as a whole: nothing to decompose it into")
        return self.chain_from(first)

    def chain_from(self, first: LayerInfo) -> list[LayerInfo]:
        """``first``, then the chain below it (built once per map)."""
        return self._chains.get(f"from {first.name}", lambda: candidate_layers(self._graph, self._maps, first.name, first))

    def root(self, seeds: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
        """(tensor, seed) of a decision on one output, or on several: the joined score outputs of a
        multi-head detector (a detection spread over the anchors of several heads)."""
        if len(seeds) == 1:
            (name, seed), = seeds.items()
            return name, seed
        if not set(seeds) <= set(self._joined_parts):
            raise InvalidInputError(f"a seed on outputs {sorted(seeds)} spans outputs that are not joined into one tensor")
        flat = [seeds[name].reshape(-1) if name in seeds else np.zeros(int(np.prod(self.shape(name))), np.float32)
                for name in self._joined_parts]
        return self.joined, np.concatenate(flat)[None]  # type: ignore[return-value]

    @functools.cached_property
    def head_branches(self) -> list[tuple[str, LayerInfo]]:
        """A detector's head branches: (score output, first layer) of each chain a single detection's
        seed can start, found with a probe seed per score output (one class at every anchor)."""
        task = self.task
        if task is None or task.detection is None:
            return []
        layout = task.detection
        probes = class_support(layout, {name: self.shape(name) for name in layout.output_names}, 0)
        return [(name, info) for name, probe in probes.items()
                for info in branch_layers(self._graph, self.nm, self._maps, name, probe)]

    def branch_taps(self, depth: int | None = None) -> frozenset[str]:
        """What a detector's first forward run returns beside its outputs, since a detection's
        layers are known only once it is decoded: the layers and side inputs of every head
        branch's chain, down to ``depth`` levels (None: all)."""
        def taps() -> frozenset[str]:
            chains = ([output, *(info.name for info in self.chain_from(first))][: None if depth is None else depth + 1]
                      for output, first in self.head_branches)
            return frozenset(name for chain in chains for name in self.chain_state(chain))

        return self._branch_taps.get(depth, taps)

    def chain_state(self, chain: list[str]) -> set[str]:
        """Forward tensors the level runs along ``chain`` read (its layers and their side inputs)."""
        return {name for upper, lower in zip(chain[:-1], chain[1:]) for name in self.state_names(upper, lower)}

    @property
    def providers(self) -> list[str]:
        current = self._forward
        return current[1].get_providers() if current is not None else []

    # -- running --------------------------------------------------------------------------------
    def forward(self, feeds: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
        """Activations of ``names`` for these inputs, all from one forward run."""
        wanted = list(dict.fromkeys(names))
        computed = [n for n in wanted if n not in feeds]
        values = dict(zip(computed, self._forward_session(computed).run(computed, dict(feeds)))) if computed else {}
        return {n: feeds[n] if n in feeds else values[n] for n in wanted}

    def run_vjp(self, upper: str, lower: str, state: Mapping[str, np.ndarray], seeds: np.ndarray) -> np.ndarray:
        """VJPs for a seed batch [P, *shape(upper)] given forward ``state`` (lower + side inputs)."""
        cone = self.cone(upper, lower)
        session = self._session(("vjp", upper, lower), lambda: vjp_model(self.nm, cone),
                                f"gradient graph {lower} <- {upper}")
        feeds = {name: state[name] for name in cone.state_names}
        feeds[SEED] = np.ascontiguousarray(seeds, dtype=np.float32)
        return session.run([VJP], feeds)[0]

    def run_segment(
        self, upper: str, lower: str, state: Mapping[str, np.ndarray], mask: np.ndarray | None = None
    ) -> np.ndarray:
        """``upper`` recomputed from ``lower`` (and side inputs) in ``state``; ``mask`` scales channels."""
        cone = self.cone(upper, lower)
        masked = mask is not None
        session = self._session(
            ("segment", upper, lower, "masked" if masked else "plain"),
            lambda: segment_model(self.nm, cone, self.layer(lower).channel_axis if masked else None),
            f"segment {lower} -> {upper}",
        )
        feeds = {name: state[name] for name in cone.state_names}
        if mask is not None:
            feeds[MASK] = np.asarray(mask, dtype=np.float32)
        return session.run([upper], feeds)[0]

    # -- device-resident runs (see levels.py) ------------------------------------------------------
    @property
    def placement(self) -> Placement:
        """Where this model's OrtValues live: the first provider of the forward session."""
        return placement_for(self._forward_session(()))

    def forward_device(self, feeds: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, ort.OrtValue]:
        """Like ``forward``, but the activations stay on the execution device."""
        return self.forward_many([(feeds, names)])[0]

    def forward_many(self, items: Sequence[tuple[Mapping[str, np.ndarray], Iterable[str]]]) -> list[dict[str, ort.OrtValue]]:
        """``forward_device`` for several inputs at once: stacked copies of the forward session's
        model, one run per at most ``MAX_STACK`` inputs."""
        wanted = [list(dict.fromkeys(names)) for _, names in items]
        union = sorted({n for (feeds, _), names in zip(items, wanted) for n in names if n not in feeds})
        session = self._forward_session(union)
        placement = placement_for(session)
        taps = self._forward[0]
        results = []
        for part in _stack_parts(list(zip(items, wanted)), self._max_stack):
            copies = len(part)
            computed = sorted({n for (feeds, _), names in part for n in names if n not in feeds})
            if computed:
                stacked = session if copies == 1 else self._stacked_session(
                    ("forward", taps), lambda: self._tap_model(taps), "forward model", copies)
                inputs = {self._copy_name(name, copy, copies): value
                          for copy, ((feeds, _), _) in enumerate(part) for name, value in feeds.items()}
                names = [self._copy_name(name, copy, copies) for copy in range(copies) for name in computed]
                values = dict(zip(names, run_bound(stacked, placement, inputs, names)))
            for copy, ((feeds, _), names) in enumerate(part):
                results.append({n: placement.to_device(feeds[n]) if n in feeds else values[self._copy_name(n, copy, copies)]
                                for n in names})
        return results

    @functools.cached_property
    def _max_stack(self) -> int:
        """Copies per stacked run: one for a model with sub-graphs (If, Loop, Scan), which cannot be
        stacked (its runs of several inputs are then one after the other)."""
        return MAX_STACK if stackable(self.nm.model) else 1

    @staticmethod
    def _copy_name(name: str, copy: int, copies: int) -> str:
        return name if copies == 1 else stacked_name(name, copy)

    def _stacked_session(self, key: tuple, model: Callable[[], onnx.ModelProto], what: str,
                         copies: int) -> ort.InferenceSession:
        """The session of ``copies`` stacked copies of a graph (the graph itself for one copy)."""
        if copies == 1:
            return self._session(key, model, what)
        return self._session((*key, f"x{copies}"), lambda: stack(model(), copies), f"{what} x{copies}")

    def run_level(self, upper: str, lower: str, state: Mapping[str, ort.OrtValue], seeds: ort.OrtValue,
                  precision: str = "float32") -> tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]:
        """(G, net scores [P, C], positive scores [P, C]) for device seeds [P, *shape(upper)]."""
        return self.run_levels(upper, lower, [(state, seeds)], precision)[0]

    def run_levels(self, upper: str, lower: str, items: Sequence[tuple[Mapping[str, ort.OrtValue], ort.OrtValue]],
                   precision: str = "float32") -> list[tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]]:
        """``run_level`` for several (state, seeds) at once (several inputs' trees): stacked copies of
        the level graph (graph/stack.py), one run per at most ``MAX_STACK`` items."""
        cone = self.cone(upper, lower)

        def build() -> onnx.ModelProto:
            model = level_model(self.nm, cone, self.layer(lower).channel_axis)
            return to_float16(model) if precision == "float16" else model

        key, what = ("level", upper, lower, precision), f"{precision} level graph {lower} <- {upper}"
        outputs = [VJP, SCORES_NET, SCORES_POSITIVE]
        results = []
        for part in _stack_parts(items, self._max_stack):
            session = self._stacked_session(key, build, what, len(part))
            inputs: dict[str, ort.OrtValue | np.ndarray] = {}
            for copy, (state, seeds) in enumerate(part):
                inputs.update({self._copy_name(name, copy, len(part)): state[name] for name in cone.state_names})
                inputs[self._copy_name(SEED, copy, len(part))] = seeds
            names = [self._copy_name(name, copy, len(part)) for copy in range(len(part)) for name in outputs]
            values = run_bound(session, self.placement, inputs, names)
            results.extend(tuple(values[3 * copy : 3 * copy + 3]) for copy in range(len(part)))
        return results

    def select(self, lower: str, grad: ort.OrtValue, activation: ort.OrtValue, rows: np.ndarray,
               channels: np.ndarray, with_seeds: bool = True) -> tuple[ort.OrtValue, ort.OrtValue | None]:
        """(maps [n, *spatial], child seeds [n, *shape(lower)] or None) of the chosen (row, channel) pairs."""
        info = self.layer(lower)
        session = selection_session(len(info.shape), info.channel_axis, with_seeds, self.runtime)
        inputs = {VJP: grad, "gap_activation": activation, ROWS: rows.astype(np.int64), CHANNELS: channels.astype(np.int64)}
        outputs = run_bound(session, self.placement, inputs, [MAPS, CHILD_SEEDS] if with_seeds else [MAPS])
        return outputs[0], (outputs[1] if with_seeds else None)

    # -- sessions ---------------------------------------------------------------------------------
    def _session(self, key: tuple[str, ...], model: Callable[[], onnx.ModelProto], what: str) -> ort.InferenceSession:
        """The session of one graph, built (graph and session) on its first run only."""
        return self._sessions.get(key, lambda: runtime.make_session(model(), self.runtime, what))

    @functools.cached_property
    def _default_taps(self) -> frozenset[str]:
        """What explanations along the default chain read: the decision, the default layers and
        the side inputs of each pair, so the first forward session already serves them."""
        decision = self.decision
        names = {decision.logits, *([decision.probabilities] if decision.probabilities else []),
                 *self.chain_state([decision.logits, *(info.name for info in self._default_layers)])}
        task = self.task
        if task is not None and task.detection is not None:  # decoded before their layers are known
            names.update(task.detection.output_names, self.branch_taps())
        return frozenset(names - set(self.nm.inputs))

    def _forward_session(self, names: Iterable[str]) -> ort.InferenceSession:
        """The forward session. It taps the default taps and whatever its first caller asked for;
        a later request for a tensor outside its taps (an explicitly chosen one) rebuilds it with
        the union, since every tap session holds all the weights. This is the one cached value
        that grows, hence its own lock rather than ``BuildOnce``."""
        wanted = set(names)
        current = self._forward
        if current is not None and wanted <= current[0]:
            return current[1]
        with self._forward_lock:
            current = self._forward
            if current is None or not wanted <= current[0]:
                taps = frozenset(wanted | self._default_taps | (current[0] if current else frozenset()))
                log.info("building the forward session of %s with %d taps", self.nm.model.graph.name, len(taps))
                current = self._forward = (taps, runtime.make_session(self._tap_model(taps), self.runtime, "forward model"))
        return current[1]

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


def _join(nm: NormalizedModel, names: tuple[str, ...], joined: str) -> NormalizedModel:
    """The model with one more tensor, ``joined``: ``names`` flattened and concatenated, [1, total]."""
    model = onnx.ModelProto()
    model.CopyFrom(nm.model)
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), f"{joined}/shape"))
    flat = [f"{name}/flat" for name in names]
    graph.node.extend(onnx.helper.make_node("Reshape", [name, f"{joined}/shape"], [out], name=out)
                      for name, out in zip(names, flat))
    graph.node.append(onnx.helper.make_node("Concat", flat, [joined], name=joined, axis=1))
    sizes = {out: (1, int(np.prod(nm.shapes[name]))) for name, out in zip(names, flat)}
    shapes = {**nm.shapes, **sizes, joined: (1, sum(size for _, size in sizes.values()))}
    dtypes = {**nm.dtypes, **{name: np.dtype(np.float32) for name in [*flat, joined]}}
    return replace(nm, model=model, shapes=shapes, dtypes=dtypes)
