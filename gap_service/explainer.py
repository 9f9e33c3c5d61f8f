"""The public entry point: ``Explainer`` wraps one ONNX model for predictions, gradients and explanations.

The CLI and the server call only this class: every request is one call here, with inputs
(tensors or an encoded image) and one ``ExplainOptions``; everything below it (compiled graphs,
sessions, the engine) is an implementation detail.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import decisions, engine, faithfulness
from .compiled import CompiledModel
from .engine import LevelCallback
from .errors import invalid
from .explanation import Explanation
from .faithfulness import Ablation
from .graph.layers import Decision, LayerInfo
from .graph.loader import InputSpec, ModelSource, input_specs, normalize, read_model, resolve_input_shapes
from .inputs import EncodedImage, InputPolicy, Inputs, Prepared
from .options import ExplainOptions
from .prediction import DEFAULT_TOP_CLASSES, DetectedBox, Prediction, top_classes
from .preprocess import DEFAULT_MAX_PIXELS, Preprocessing
from .runtime import RuntimeConfig
from .state_cache import StateCache
from .targets import Detection, Task

if TYPE_CHECKING:
    from .atlas import Atlas

MAX_SPECIALISATIONS = 4

__all__ = ["EncodedImage", "ExplainJob", "ExplainOptions", "Explainer", "ModelDescription"]


@dataclass(frozen=True)
class ModelDescription:
    """What a client needs to know to call the model (GetModel, ``inspect``)."""

    inputs: list[tuple[InputSpec, tuple[int, ...]]]  # each input with the shape it runs at
    decision: Decision
    layers: list[LayerInfo]  # the default chain first, then the other discovered layers
    default_layers: tuple[str, ...]
    labels: tuple[str, ...]
    preprocessing: Preprocessing | None
    input_hw: tuple[int, int]
    providers: list[str]
    task: Task | None = None  # declared in the config, or a detection head detected from the output shapes
    classes: int = 0  # classes of the decision (a class vector's length, a detector's classes)

    @property
    def num_classes(self) -> int:
        return self.classes

    @property
    def max_map_elements(self) -> int:
        """Largest map a node (or an upsampled heatmap) can have."""
        height, width = self.input_hw
        return max([height * width, *(int(np.prod(info.spatial_shape)) for info in self.layers)])


@dataclass
class ExplainJob:
    """One explanation for ``Explainer.run``: what ``explain`` takes, or with a ``path``, ``expand``."""

    inputs: Inputs
    options: ExplainOptions | None = None
    path: Sequence[int] | None = None  # the node to expand (its subtree is the result)
    picture: np.ndarray | None = None
    on_level: LevelCallback | None = None
    should_stop: Callable[[], bool] | None = None


def _raised(result: Explanation | Exception) -> Explanation:
    if isinstance(result, Exception):
        raise result
    return result


class Explainer:
    """Predictions, gradients and gAP explanations for any ONNX CNN.

    The model is normalised and compiled lazily per input shape (a fully static model compiles
    once). ``providers`` picks onnxruntime execution providers; default: CUDA when available,
    else CPU. ``labels``, ``preprocessing`` (for encoded images) and ``layers`` (the default
    chain) usually come from the model's config.json; ``fixed_shapes`` makes the configured input
    shapes the only ones accepted (a served model compiles once, whatever clients send).
    ``atlas_dir`` says where the model's channel atlas is (default: ``atlas/`` beside the file).
    ``task`` (config.json's "task", docs/targets.md) says what the outputs mean: a detector's
    layout, a dense map; it picks the decision an explanation without a target decomposes.
    ``state_cache`` keeps each input's forward state and computed nodes (state_cache.py), so that
    ``expand`` on an input explained before costs one level run; one cache can serve many models.
    """

    def __init__(
        self,
        model_path_or_bytes: ModelSource,
        providers: Sequence[str | tuple[str, dict[str, str]]] | None = None,
        *,
        input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
        output: str | None = None,
        explain_probability: bool = False,
        runtime: RuntimeConfig | None = None,
        name: str | None = None,
        labels: Sequence[str] = (),
        preprocessing: Preprocessing | None = None,
        layers: Sequence[str] | None = None,
        fixed_shapes: bool = False,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        atlas_dir: str | os.PathLike | None = None,
        task: Task | Mapping[str, object] | None = None,
        state_cache: StateCache | None = None,
    ) -> None:
        self._proto = read_model(model_path_or_bytes)
        self._model_path = Path(model_path_or_bytes) if isinstance(model_path_or_bytes, (str, os.PathLike)) else None
        self._atlas_dir = atlas_dir
        self.state_cache = state_cache
        self._atlas: Atlas | None = None
        self._atlas_lock = threading.Lock()
        self.name = name or self._proto.graph.name or "model"
        self.inputs: list[InputSpec] = input_specs(self._proto)
        self.labels = tuple(labels)
        self.preprocessing = preprocessing
        self.default_layers = tuple(layers) if layers else None
        self.task = Task.from_config(task) if isinstance(task, Mapping) else task
        self._runtime = runtime or RuntimeConfig(providers=tuple(providers) if providers else None)
        self._output = output
        self._explain_probability = explain_probability
        if input_shapes is not None and not isinstance(input_shapes, Mapping):
            input_shapes = {self.inputs[0].name: tuple(input_shapes)}  # a bare shape: the first input
        self._default_shapes = dict(input_shapes or {})
        fixed = resolve_input_shapes(self.inputs, self._default_shapes) if fixed_shapes else None
        self._policy = InputPolicy(self.inputs, preprocessing, fixed, max_image_pixels)
        self._compiled: OrderedDict[tuple, CompiledModel] = OrderedDict()
        self._lock = threading.Lock()

    # -- compilation ------------------------------------------------------------------------------
    def compiled(self, shapes: Mapping[str, Sequence[int]] | None = None) -> CompiledModel:
        """The model specialised to these input shapes (default: the model's own / the configured)."""
        resolved = resolve_input_shapes(self.inputs, {**self._default_shapes, **dict(shapes or {})})
        key = tuple(sorted(resolved.items()))
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        nm = normalize(self._proto, resolved)
        compiled = CompiledModel(nm, self._runtime, self._output, self._explain_probability, self.task)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SPECIALISATIONS:
                self._compiled.popitem(last=False)
        return compiled

    def prepare(self, inputs: Inputs, picture: np.ndarray | None = None) -> Prepared:
        """Validate inputs (names, dtypes, shapes, finiteness; images decoded and preprocessed)."""
        return self._policy.prepare(inputs, picture)

    def feeds(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """The validated feed dict of ``inputs`` (for ``forward`` and lower-level calls)."""
        return self.prepare(inputs).feeds

    def _compiled_for(self, feeds: Mapping[str, np.ndarray]) -> CompiledModel:
        return self.compiled({name: value.shape for name, value in feeds.items()})

    # -- description ----------------------------------------------------------------------------
    def layers(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[str]:
        """Candidate layer names, highest (nearest the decision) first."""
        return [info.name for info in self.compiled(input_shapes).layers]

    def layer_infos(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[LayerInfo]:
        return list(self.compiled(input_shapes).layers)

    def decision(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Decision:
        return self.compiled(input_shapes).decision

    def describe(self) -> ModelDescription:
        """The model at its configured input shapes: inputs, decision, layers, labels, preprocessing."""
        compiled = self.compiled()
        chain = self.default_layers or tuple(info.name for info in compiled.layers)
        names = dict.fromkeys([*chain, *(info.name for info in compiled.layers)])
        return ModelDescription(
            inputs=[(spec, tuple(compiled.nm.inputs[spec.name])) for spec in self.inputs],
            decision=compiled.decision, layers=[compiled.layer(name) for name in names], default_layers=tuple(chain),
            labels=self.labels, preprocessing=self.preprocessing, input_hw=compiled.input_hw,
            providers=compiled.providers, task=compiled.task, classes=decisions.classes(compiled),
        )

    def atlas(self, required: bool = False) -> Atlas | None:
        """The model's channel atlas (docs/atlas.md: what each channel responds to), loaded on first
        use and kept; None while none is built, or with ``required`` the AtlasNotFoundError that says
        how to build one. Absence is not cached, so a server finds an atlas built after it started.

        An atlas made for another model file raises AtlasMismatchError rather than being ignored:
        its patches would describe another model's channels. Only a model given as a path has one,
        since an atlas is tied to the file's digest.
        """
        from .atlas import AtlasNotFoundError, load_atlas  # atlas/ builds on this module: imported late

        with self._atlas_lock:
            if self._atlas is None:
                try:
                    if self._model_path is None:
                        raise AtlasNotFoundError(f"model '{self.name}' was given as bytes: only a model file has a "
                                                 "channel atlas, so load it from its path")
                    self._atlas = load_atlas(self._model_path, self._atlas_dir)
                except AtlasNotFoundError:
                    if required:
                        raise
            return self._atlas

    def atlas_layers(self) -> tuple[str, ...]:
        """The layers the model's atlas covers; none without an atlas, or with one of another model
        file (GetChannel says why)."""
        from .atlas import AtlasMismatchError

        try:
            atlas = self.atlas()
        except AtlasMismatchError:
            return ()
        return tuple(atlas.layers) if atlas is not None else ()

    # -- predictions and explanations ---------------------------------------------------------------
    def predict(self, inputs: Inputs, top_k: int = DEFAULT_TOP_CLASSES) -> Prediction:
        """The decision's output; the ``top_k`` classes (labels and probabilities) where it is a class
        vector; a detector's decoded boxes (after NMS, best first)."""
        if top_k < 1:
            raise invalid("top_k", f"{top_k} must be at least 1")
        feeds = self.feeds(inputs)
        compiled = self._compiled_for(feeds)
        decision = compiled.decision
        layout = compiled.task.detection if compiled.task is not None else None
        names = [decision.logits, *([decision.probabilities] if decision.probabilities else []),
                 *(layout.output_names if layout is not None else ())]
        started = time.perf_counter()
        values = compiled.forward(feeds, names)
        found = decisions.detections(compiled, values) if layout is not None else []
        seconds = time.perf_counter() - started
        logits = values[decision.logits]
        probabilities = values[decision.probabilities] if decision.probabilities else None
        # A detector's score output may look like a class vector ([1, anchors, 1]): its boxes are the answer.
        classes = top_classes(logits, probabilities, self.labels, top_k) \
            if layout is None and decisions.is_class_vector(logits.shape) else []
        return Prediction(logits, classes, seconds, [self._labelled(d) for d in found])

    def detections(self, inputs: Inputs) -> list[DetectedBox]:
        """The boxes the model's detection task decodes (after class-wise NMS, best first): what a
        ``DetectionTarget`` indexes. An error for a model without a detection task."""
        feeds = self.feeds(inputs)
        compiled = self._compiled_for(feeds)
        _, layout = decisions.detection_layout(compiled, "task")
        return [self._labelled(d) for d in decisions.detections(compiled, compiled.forward(feeds, layout.output_names))]

    def warm_up(self) -> None:
        """Build and run once, on zeros at the configured shapes, the sessions a first request needs:
        a classifier's forward run and every level of its default chain. Other decisions depend on
        the input (a detector finds no box in zeros), so they get the forward run only, whose taps
        cover every head branch; their level graphs are built by their first request."""
        compiled = self.compiled()
        zeros = {name: np.zeros(shape, dtype=np.dtype(compiled.nm.dtypes[name])) for name, shape in compiled.nm.inputs.items()}
        task = compiled.task
        if (task is None or task.kind == "classification") and decisions.is_class_vector(compiled.decision.shape):
            depth = len(self.default_layers or compiled.layers)
            self.explain(zeros, top_k=1, depth=depth)
        else:
            compiled.forward(zeros, [compiled.decision.logits])

    def _labelled(self, detection: Detection) -> DetectedBox:
        label = self.labels[detection.label] if detection.label < len(self.labels) else ""
        return DetectedBox(detection.box, detection.label, label, detection.score, detection.outputs)

    def explain(
        self,
        inputs: Inputs,
        options: ExplainOptions | None = None,
        *,
        picture: np.ndarray | None = None,
        on_level: LevelCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        **fields: object,
    ) -> Explanation:
        """Decompose the decision ``<seed, output>`` that ``options.target`` or ``options.seed`` names
        (default: the model's task default, a classifier's top-1 class) into a tree of supporting
        channels (docs/targets.md).

        ``fields`` override single options (``explain(x, top_k=3, depth=2)``,
        ``explain(x, target=DetectionTarget(0))``, ``explain(x, output="out", seed=array)``). ``root_path``
        (channels from the root) first follows one branch of the tree, decomposing only the
        path's nodes, and then the node it ends at in full: what "expand this node" needs, at the
        cost of the path plus the subtree (see ``expand``).
        """
        job = ExplainJob(inputs, self._options(options, fields), picture=picture, on_level=on_level, should_stop=should_stop)
        return _raised(self.run([job])[0])

    def expand(self, inputs: Inputs, path: Sequence[int], options: ExplainOptions | None = None, *,
               on_level: LevelCallback | None = None, should_stop: Callable[[], bool] | None = None,
               **fields: object) -> Explanation:
        """The subtree below the node at ``path`` (channels from the root); ``top_k`` and ``depth``
        apply to the subtree (and ``top_k`` along the path). nodes[0] is the node, ids from 0."""
        job = ExplainJob(inputs, self._options(options, fields), path=path, on_level=on_level, should_stop=should_stop)
        return _raised(self.run([job])[0])

    def explain_many(self, inputs: Sequence[Inputs], options: ExplainOptions | None = None, **fields: object) -> list[Explanation]:
        """One tree per input, computed together (see ``run``); the same options for all. The first
        input that fails raises its error (with a note naming the input)."""
        options = self._options(options, fields)
        results = self.run([ExplainJob(item, options) for item in inputs])
        for index, result in enumerate(results):
            if isinstance(result, Exception):
                result.add_note(f"(inputs[{index}])")
                raise result
        return results  # type: ignore[return-value]

    def run(self, jobs: Sequence[ExplainJob]) -> list[Explanation | Exception]:
        """Several explanations computed together: the forward runs of inputs of the same shapes
        are one run, and so are their level runs of the same layer pair (engine.explain_all).
        Each result is what ``explain`` (or ``expand``, for a job with a path) alone returns; a
        job that fails (a bad input, a bad path, its caller cancelling) gets its exception in its
        place, and the others go on. ``engine_seconds`` is the time of the whole computation."""
        results: list[Explanation | Exception | None] = [None] * len(jobs)
        groups: dict[int, tuple[CompiledModel, list[tuple[int, engine.Job]]]] = {}
        for index, job in enumerate(jobs):
            try:
                options = self._options(job.options, {})
                if job.path is not None:
                    path = tuple(int(c) for c in job.path)
                    options = replace(options, root_path=path, depth=len(path) + options.depth)
                prepared = self.prepare(job.inputs, job.picture)
                compiled = self._compiled_for(prepared.feeds)
            except Exception as exc:  # noqa: BLE001 - this job's failure, not the others'
                results[index] = exc
                continue
            work = engine.Job(prepared.feeds, options, self.name, self.labels or None, prepared.picture, job.on_level,
                              job.should_stop)
            groups.setdefault(compiled.token, (compiled, []))[1].append((index, work))
        for compiled, members in groups.values():
            started = time.perf_counter()
            trees = engine.explain_all(compiled, [work for _, work in members], cache=self.state_cache)
            seconds = time.perf_counter() - started
            for (index, work), tree in zip(members, trees):
                if isinstance(tree, Explanation):
                    if jobs[index].path is not None:
                        tree = tree.subtree(work.options.root_path)
                    tree.engine_seconds = seconds
                results[index] = tree
        return results  # type: ignore[return-value]

    def _options(self, options: ExplainOptions | None, fields: Mapping[str, object]) -> ExplainOptions:
        options = options or ExplainOptions()
        if fields:
            try:
                options = replace(options, **fields)
            except TypeError as exc:
                raise TypeError(f"{exc}; the options are the fields of ExplainOptions") from exc
        if options.layers is not None:
            options = replace(options, layers=tuple(options.layers))
        elif self.default_layers:
            options = replace(options, layers=self.default_layers)
        if options.root_path:
            options = replace(options, root_path=tuple(int(c) for c in options.root_path))
        options.validate()
        return options

    def ablate(self, inputs: Inputs, layer: str, channels: Sequence[int], target: int | None = None) -> Ablation:
        """The decision's logit before and after zeroing ``channels`` of ``layer`` (the faithfulness
        check of docs/faithfulness.md for the root; target default: the top-1 class)."""
        feeds = self.feeds(inputs)
        compiled = self._compiled_for(feeds)
        info = compiled.layer(layer)
        bad = [c for c in channels if not 0 <= int(c) < info.channels]
        if bad:
            raise invalid("channels", f"{bad} out of range: layer '{layer}' has {info.channels} channels")
        logits = compiled.decision.logits
        plan = decisions.class_target(compiled, compiled.decision, target)
        state = compiled.forward(feeds, [*plan.reads, *compiled.state_names(logits, layer)])
        seed = plan.resolve(state).seeds[logits]
        return faithfulness.ablate(compiled, logits, layer, state, seed, channels)

    # -- gradients ------------------------------------------------------------------------------
    def forward(self, inputs: Inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
        feeds = self.feeds(inputs)
        return self._compiled_for(feeds).forward(feeds, names)

    def vjp(self, inputs: Inputs, upper: str, lower: str, seeds: np.ndarray) -> np.ndarray:
        """``[P, *shape(lower)]`` gradients of <seeds[p], upper> with respect to ``lower``."""
        feeds = self.feeds(inputs)
        compiled = self._compiled_for(feeds)
        upper_shape = compiled.shape(upper)
        seeds = np.asarray(seeds, dtype=np.float32)
        if seeds.ndim != len(upper_shape) + 1 or tuple(seeds.shape[1:]) != tuple(upper_shape):
            raise invalid("seeds", f"shape {list(seeds.shape)} must be [P, *{list(upper_shape)}] for upper tensor '{upper}'")
        if seeds.shape[0] == 0:
            raise invalid("seeds", "needs at least one seed (P >= 1)")
        state = compiled.forward(feeds, compiled.state_names(upper, lower))
        return compiled.run_vjp(upper, lower, state, seeds)
