"""GapService: a thin adapter, proto -> typed request -> engine call -> proto.

Every method takes ``(request, context, record)`` and runs inside ``RpcGuard`` (errors.py),
which maps the domain exceptions raised here to status codes; nothing here picks a status code.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from .. import engine
from ..compiled import CompiledModel
from ..errors import InvalidModelError, ResourceLimitError, UnknownModelError, invalid
from ..explainer import Explainer
from ..explanation import Explanation, Node
from ..preprocess import decode_image, preprocess
from ..repository import ModelEntry, find_model, load_repository
from ..runtime import RuntimeConfig
from . import convert, pb
from .errors import CallRecord
from .limits import Admission, ServerLimits
from .metrics import Metrics

log = logging.getLogger("gap_service.server")
S = pb.service
M = pb.model


@dataclass
class LoadedModel:
    """A model ready to serve: its explainer compiled at the served input shapes and warmed up."""

    entry: ModelEntry
    explainer: Explainer
    compiled: CompiledModel
    shapes: dict[str, tuple[int, ...]]
    load_seconds: float
    chain: list[str]  # default layer chain
    max_map_elements: int
    num_classes: int
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.config.name

    @property
    def providers(self) -> list[str]:
        return self.compiled.providers

    def response_bytes_bound(self, max_nodes: int) -> int:
        """Largest Explain/Expand response for a tree of ``max_nodes`` nodes (every option on)."""
        height, width = engine.input_hw(self.compiled)
        per_node = 4 * self.max_map_elements + convert.heatmap_bytes_bound((height, width)) + 1024
        picture = height * width * 3 + 1024
        cams = 3 * (4 * self.max_map_elements + 256)
        return max_nodes * per_node + picture + cams + 2**20


def prepare_model(entry: ModelEntry, runtime: RuntimeConfig) -> LoadedModel:
    """Load and compile the model at its served input shapes (sessions come with ``warm_up``)."""
    started = time.perf_counter()
    explainer = entry.explainer(runtime)
    compiled = explainer.compiled()
    shapes = {name: tuple(shape) for name, shape in compiled.nm.inputs.items()}
    chain = list(entry.config.layers or [info.name for info in compiled.layers])
    if not chain:
        raise InvalidModelError(f"model '{entry.config.name}' has no candidate layers to explain")
    num_classes = int(np.prod(compiled.decision.shape))
    infos = [compiled.layer(name) for name in chain] + list(compiled.layers)
    max_map = max(int(np.prod(info.spatial_shape)) for info in infos)
    height, width = engine.input_hw(compiled)
    return LoadedModel(entry, explainer, compiled, shapes, time.perf_counter() - started, chain,
                       max(max_map, height * width), num_classes)


def warm_up(model: LoadedModel) -> None:
    """Build every session once (forward and each gradient pair of the default chain) and run them."""
    started = time.perf_counter()
    zeros = {spec.name: np.zeros(model.shapes[spec.name], dtype=spec.dtype) for spec in model.explainer.inputs}
    model.explainer.explain(zeros, layers=model.chain, top_k=1, depth=len(model.chain))
    model.load_seconds += time.perf_counter() - started


class ModelStore:
    """The repository's models, loaded once at start."""

    def __init__(self, repository: str | Path, runtime: RuntimeConfig, names: Sequence[str] | None = None) -> None:
        entries = load_repository(repository)
        if names:
            missing = sorted(set(names) - set(entries))
            if missing:
                raise UnknownModelError(f"models {missing} are not in the repository {repository} (it has {sorted(entries)})")
            entries = {name: entries[name] for name in names}
        self.entries = entries
        self.runtime = runtime
        self.prepared: dict[str, LoadedModel] = {}
        self.models: dict[str, LoadedModel] = {}  # prepared and warmed up: served

    def prepare_all(self) -> None:
        for name, entry in self.entries.items():
            self.prepared[name] = prepare_model(entry, self.runtime)

    def warm_all(self, metrics: Metrics | None = None, warmup: bool = True) -> None:
        for name, model in self.prepared.items():
            if warmup:
                warm_up(model)
            self.models[name] = model
            if metrics is not None:
                metrics.model_load.labels(name).set(model.load_seconds)
                metrics.model_info.labels(name, str(model.entry.version), ",".join(model.providers)).set(1)
            log.info("model loaded", extra={"fields": {
                "model": name, "version": model.entry.version, "providers": model.providers,
                "load_seconds": round(model.load_seconds, 3), "inputs": {k: list(v) for k, v in model.shapes.items()},
                "layers": model.chain,
            }})

    def get(self, name: str, version: int = 0) -> LoadedModel:
        entry = find_model(self.entries, name)
        if version and version != entry.version:
            state = "exists but is not served" if version in entry.versions else "does not exist"
            raise UnknownModelError(f"model '{name}' version {version} {state}; serving version {entry.version}")
        model = self.models.get(name)
        if model is None:
            raise UnknownModelError(f"model '{name}' is not loaded")
        return model


class GapServicer:
    """The six RPCs of gap.v1.GapService."""

    def __init__(self, store: ModelStore, limits: ServerLimits, metrics: Metrics, max_response_bytes: int) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.max_response_bytes = max_response_bytes
        self.explanations = Admission("explanations", limits.max_concurrent, limits.max_queue, metrics.pool_changed("explain"))
        self.predictions = Admission("predictions", limits.max_concurrent_predict, limits.max_queue_predict,
                                     metrics.pool_changed("predict"))

    # -- description ----------------------------------------------------------------------------
    def ListModels(self, request, context, record: CallRecord):
        return S.ListModelsResponse(models=[self._summary(self.store.get(name)) for name in sorted(self.store.models)])

    def GetModel(self, request, context, record: CallRecord):
        convert.require_model(request.model)
        record.model = request.model
        model = self.store.get(request.model, request.version)
        config = model.entry.config
        compiled = model.compiled
        chain = set(model.chain)
        layers = [compiled.layer(name) for name in dict.fromkeys([*model.chain, *(i.name for i in compiled.layers)])]
        pre = config.preprocessing
        return S.GetModelResponse(
            model=self._summary(model),
            inputs=[M.InputInfo(name=spec.name, dtype=convert.dtype_code(spec.dtype), shape=list(model.shapes[spec.name]))
                    for spec in model.explainer.inputs],
            decision=M.DecisionInfo(logits=compiled.decision.logits, probabilities=compiled.decision.probabilities or "",
                                    num_classes=model.num_classes),
            layers=[M.LayerInfo(name=info.name, shape=list(info.shape), channel_axis=info.channel_axis,
                                map_shape=list(info.spatial_shape), op=info.op, default=info.name in chain) for info in layers],
            labels=list(config.labels),
            preprocessing=M.Preprocessing(
                resize=pre.resize, size=list(pre.size), crop=list(pre.crop or ()), scale=pre.scale, mean=list(pre.mean),
                std=list(pre.std), channel_order=pre.channel_order, layout=pre.layout),
            limits=M.Limits(
                max_request_bytes=self.limits.max_request_bytes, max_response_bytes=self.max_response_bytes,
                max_image_pixels=self.limits.max_image_pixels, max_tree_nodes=self.limits.max_tree_nodes,
                max_top_k=engine.MAX_TOP_K, max_concurrent_explanations=self.limits.max_concurrent,
                max_queued_explanations=self.limits.max_queue),
            load_seconds=model.load_seconds,
        )

    def _summary(self, model: LoadedModel) -> M.ModelSummary:
        entry = model.entry
        return M.ModelSummary(name=model.name, version=entry.version, versions=list(entry.versions),
                              description=entry.config.description, num_classes=model.num_classes,
                              providers=model.providers)

    # -- inputs ---------------------------------------------------------------------------------
    def _inputs(self, model: LoadedModel, message, field: str = "input") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The feeds of a request's Input (and the picture, for images), fully validated."""
        specs = model.explainer.inputs
        source = message.WhichOneof("source")
        if source is None:
            raise invalid(field, "set either image (encoded PNG/JPEG) or tensor")
        if source == "image":
            if len(specs) != 1:
                raise invalid(f"{field}.image", f"model '{model.name}' has {len(specs)} inputs; send a tensor")
            if not message.image:
                raise invalid(f"{field}.image", "is empty")
            image = decode_image(message.image, self.limits.max_image_pixels, field_name=f"{field}.image")
            tensor, picture = preprocess(image, model.entry.config.preprocessing)
            expected = model.shapes[specs[0].name]
            if tuple(tensor.shape) != expected:
                raise InvalidModelError(
                    f"model '{model.name}': its preprocessing makes a {list(tensor.shape)} tensor but the input "
                    f"'{specs[0].name}' is {list(expected)}; fix the model's config.json")
            return {specs[0].name: tensor.astype(specs[0].dtype, copy=False)}, picture
        tensor = message.tensor
        name = tensor.name or specs[0].name
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            raise invalid(f"{field}.tensor.name", f"'{name}' is not an input of model '{model.name}' ({[s.name for s in specs]})")
        if len(specs) != 1:
            raise invalid(f"{field}.tensor", f"model '{model.name}' has {len(specs)} inputs; only single-input models are served")
        array = convert.from_tensor(tensor, f"{field}.tensor")
        if array.dtype != np.dtype(spec.dtype):
            raise invalid(f"{field}.tensor.dtype",
                          f"{convert.dtype_name(tensor.dtype)}; input '{name}' takes {convert.dtype_name(convert.dtype_code(spec.dtype))}")
        expected = model.shapes[name]
        if tuple(array.shape) != expected:
            raise invalid(f"{field}.tensor.shape", f"{list(array.shape)}; input '{name}' is {list(expected)}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise invalid(f"{field}.tensor.data", "contains NaN or infinite values")
        return {name: np.ascontiguousarray(array)}, None

    # -- prediction -----------------------------------------------------------------------------
    def Predict(self, request, context, record: CallRecord):
        convert.require_model(request.model)
        record.model = request.model
        model = self.store.get(request.model, request.version)
        top_k = request.top_k if request.HasField("top_k") else convert.DEFAULT_TOP_K
        if top_k < 1:
            raise invalid("top_k", f"{top_k} must be at least 1")
        decision = model.compiled.decision
        names = [decision.logits] + ([decision.probabilities] if decision.probabilities else [])
        with self._slot(self.predictions, context):
            feeds, _ = self._inputs(model, request.input)
            started = time.perf_counter()
            values = model.compiled.forward(feeds, names)
            seconds = time.perf_counter() - started
        self.metrics.engine.labels("Predict", model.name).observe(seconds)
        logits = values[decision.logits]
        flat = logits.reshape(-1).astype(np.float64)
        if decision.probabilities:
            probabilities = values[decision.probabilities].reshape(-1).astype(np.float64)
        else:
            shifted = np.exp(flat - flat.max())
            probabilities = shifted / shifted.sum()
        order = np.argsort(-flat, kind="stable")[: min(top_k, flat.size)]
        labels = model.entry.config.labels
        return S.PredictResponse(
            logits=convert.to_tensor(logits),
            classes=[S.ClassScore(index=int(i), label=labels[i] if i < len(labels) else "", logit=float(flat[i]),
                                  probability=float(probabilities[i])) for i in order],
            engine_seconds=seconds,
        )

    # -- explanations ---------------------------------------------------------------------------
    def _chain(self, model: LoadedModel, params: convert.ExplainParams, levels: int, field: str = "options") -> list[str]:
        """The layer chain a request uses, checked (unknown layer: NOT_FOUND; too deep: INVALID_ARGUMENT)."""
        candidates = list(params.layers or model.chain)
        for index, name in enumerate(candidates):
            info = model.compiled.layer(name)  # UnknownTensorError (NOT_FOUND) for unknown names
            if len(info.shape) != 4 or info.shape[0] != 1:
                raise invalid(f"{field}.layers[{index}]", f"layer '{name}' has shape {list(info.shape)}; layers must be 4-D feature maps of batch 1")
        if levels > len(candidates):
            raise invalid(f"{field}.depth", f"{levels} levels exceed the {len(candidates)} layers of the chain {candidates}")
        if params.target is not None and params.target >= model.num_classes:
            raise invalid(f"{field}.target", f"class {params.target} is out of range [0, {model.num_classes})")
        return candidates

    def _check_size(self, params: convert.ExplainParams, extra_levels: int = 0) -> None:
        worst = params.worst_case_nodes(extra_levels)
        if worst > self.limits.max_tree_nodes:
            raise ResourceLimitError(
                f"top_k={params.top_k} over {params.depth + extra_levels} levels may produce up to {worst} nodes; "
                f"the limit is {self.limits.max_tree_nodes} nodes per request")

    def _admit(self, pool: Admission, context: grpc.ServicerContext) -> None:
        pool.acquire(context.is_active, context.time_remaining)

    @contextlib.contextmanager
    def _slot(self, pool: Admission, context: grpc.ServicerContext):
        """A computation slot; inputs are decoded inside it too, so big images count against it."""
        self._admit(pool, context)
        try:
            yield
        finally:
            pool.release()

    def _prepare(self, request, record: CallRecord, extra_levels: int = 0):
        convert.require_model(request.model)
        record.model = request.model
        params = convert.explain_params(request.options)
        output = convert.output_params(request.output)
        model = self.store.get(request.model, request.version)
        chain = self._chain(model, params, params.depth + extra_levels)
        self._check_size(params, extra_levels)
        return model, params, output, chain

    def _explain(self, model: LoadedModel, params: convert.ExplainParams, chain: list[str], feeds, picture, depth: int,
                 should_stop, on_level=None, root_path: list[int] | None = None) -> Explanation:
        return model.explainer.explain(
            feeds, layers=chain, target=params.target, top_k=params.top_k, depth=depth, min_share=params.min_share,
            score=params.score, labels=list(model.entry.config.labels) or None, picture=picture,
            on_level=on_level, should_stop=should_stop, root_path=root_path or (),
        )

    def _counted(self, model: LoadedModel, record: CallRecord, then=None):
        counter = self.metrics.nodes.labels(model.name)

        def on_level(level: int, nodes: list[Node]) -> None:
            record.nodes += len(nodes)
            counter.inc(len(nodes))
            if then is not None:
                then(level, nodes)

        return on_level

    def Explain(self, request, context, record: CallRecord):
        model, params, output, chain = self._prepare(request, record)
        with self._slot(self.explanations, context):
            feeds, picture = self._inputs(model, request.input)
            started = time.perf_counter()
            result = self._explain(model, params, chain, feeds, picture, params.depth,
                                   lambda: not context.is_active(), self._counted(model, record))
            seconds = time.perf_counter() - started
        self.metrics.engine.labels("Explain", model.name).observe(seconds)
        return S.ExplainResponse(explanation=convert.explanation_proto(result, model.entry.version, output),
                                 engine_seconds=seconds)

    def Expand(self, request, context, record: CallRecord):
        path = convert.path_param(request.path)
        model, params, output, chain = self._prepare(request, record, extra_levels=len(path))
        for step, channel in enumerate(path):
            channels = model.compiled.layer(chain[step]).shape[model.compiled.layer(chain[step]).channel_axis]
            if channel >= channels:
                raise invalid(f"path[{step}]", f"channel {channel} is out of range: layer '{chain[step]}' has {channels} channels")
        with self._slot(self.explanations, context):
            feeds, picture = self._inputs(model, request.input)
            # Recomputed from scratch (stateless): only the path down to the node, then its subtree.
            started = time.perf_counter()
            result = self._explain(model, params, chain, feeds, picture, len(path) + params.depth,
                                   lambda: not context.is_active(), self._counted(model, record), root_path=path)
            seconds = time.perf_counter() - started
        self.metrics.engine.labels("Expand", model.name).observe(seconds)
        node = convert.find_path(result, path)
        return S.ExpandResponse(explanation=convert.subtree_proto(result, node, path, model.entry.version, output),
                                engine_seconds=seconds)

    def ExplainStream(self, request, context, record: CallRecord) -> Iterator:
        model, params, output, chain = self._prepare(request, record)
        self._admit(self.explanations, context)
        try:
            feeds, picture = self._inputs(model, request.input)
        except BaseException:
            self.explanations.release()
            raise
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        labels = model.entry.config.labels
        height_width = engine.input_hw(model.compiled)

        roots: list[Node] = []

        def on_level(level: int, nodes: list[Node]) -> None:
            if level == 0:  # convert now: the root is completed (map, children) while level 1 runs
                root = nodes[0]
                roots.append(root)
                header = Explanation(
                    model=model.name, target=root.channel, label=labels[root.channel] if root.channel < len(labels) else None,
                    logit=root.score, probability=None, layers=chain[: params.depth], score_mode=params.score, nodes=[],
                    input_hw=height_width, picture=picture)
                root_message = convert.node_proto(root, [], output, height_width, with_map=False, with_children=False)
                events.put(("header", convert.header_proto(header, model.entry.version, output), root_message))
            else:
                events.put(("level", level, list(nodes)))

        def work() -> None:
            try:
                started = time.perf_counter()
                result = self._explain(model, params, chain, feeds, picture, params.depth,
                                       lambda: stop.is_set() or not context.is_active(), self._counted(model, record, on_level))
                events.put(("done", result, time.perf_counter() - started))
            except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread
                events.put(("error", exc))
            finally:
                self.explanations.release()

        worker = threading.Thread(target=work, name="gap-explain-stream", daemon=True)
        worker.start()
        paths: dict[int, list[int]] = {0: []}
        try:
            last_level = 0
            while True:
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                kind = event[0]
                if kind == "error":
                    raise event[1]
                if kind == "header":
                    yield S.ExplainStreamResponse(level=0, nodes=[event[2]], header=event[1])
                elif kind == "level":
                    _, level, nodes = event
                    last_level = level
                    for node in nodes:
                        paths[node.id] = [*paths[node.parent], node.channel]
                    message = S.ExplainStreamResponse(level=level, nodes=[
                        # children are still being added by the engine: sent empty, rebuilt from parents
                        convert.node_proto(n, paths[n.id], output, height_width, with_children=False) for n in nodes])
                    if level == 1:
                        message.root.CopyFrom(convert.node_proto(roots[0], [], output, height_width))
                    yield message
                else:
                    _, result, seconds = event
                    self.metrics.engine.labels("ExplainStream", model.name).observe(seconds)
                    summary = S.StreamSummary(node_count=len(result.nodes), engine_seconds=seconds)
                    if result.probability is not None:
                        summary.probability = result.probability
                    for name, tensor in convert.cams_protos(result, output).items():
                        summary.cams[name].CopyFrom(tensor)
                    yield S.ExplainStreamResponse(level=last_level, summary=summary)
                    return
        finally:
            stop.set()
