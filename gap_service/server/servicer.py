"""GapService: a thin adapter. Per RPC: proto -> typed request -> one Explainer call -> proto.

Every method takes ``(request, context, record)`` and runs inside ``RpcGuard`` (errors.py),
which maps the domain exceptions raised below it to status codes; nothing here picks a status
code, validates a value or runs a model itself.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import grpc

from ..cache import BuildOnce
from ..errors import ResourceLimitError, invalid
from ..explainer import Explainer, ExplainJob
from ..explanation import Explanation, Node
from ..inputs import Inputs
from ..options import MAX_TOP_K, ExplainOptions
from ..wire import messages, pb
from ..wire.messages import OutputOptions
from .batching import Batcher
from .errors import CallRecord, embedded
from .limits import Admission, ServerLimits
from .metrics import Metrics
from .store import LoadedModel, ModelStatus, ModelStore

S = pb.service
M = pb.model
STREAM_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class ExplainCall:
    """An Explain, ExplainStream or Expand request, decoded and checked, with its model."""

    model: LoadedModel
    inputs: Inputs
    options: ExplainOptions
    output: OutputOptions
    record: CallRecord
    path: tuple[int, ...] = ()


class GapServicer:
    """The RPCs of gap.v1.GapService."""

    def __init__(self, store: ModelStore, limits: ServerLimits, metrics: Metrics, max_response_bytes: int) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.max_response_bytes = max_response_bytes
        self.explanations = Admission("explanations", limits.max_concurrent, limits.max_queue, metrics.pool_changed("explain"))
        self._batchers: BuildOnce[Explainer, Batcher] = BuildOnce()  # one per served model
        self.predictions = Admission("predictions", limits.max_concurrent_predict, limits.max_queue_predict,
                                     metrics.pool_changed("predict"))

    # -- description ----------------------------------------------------------------------------
    def ListModels(self, request: S.ListModelsRequest, context: grpc.ServicerContext, record: CallRecord) -> S.ListModelsResponse:
        return S.ListModelsResponse(models=[self._summary(status) for status in self.store.statuses()])

    def GetModel(self, request: S.GetModelRequest, context: grpc.ServicerContext, record: CallRecord) -> S.GetModelResponse:
        status = self.store.status(self._named(request.model, record), request.version)
        if status.model is None:  # unavailable: its state and reason
            return S.GetModelResponse(model=self._summary(status), limits=self._limits())
        model = status.model
        return messages.description_proto(model.description, self._summary(status), self._limits(), model.load_seconds)

    def _summary(self, status: ModelStatus) -> M.ModelSummary:
        description = status.model.description if status.model else None
        return messages.summary_proto(status.name, status.version, status.versions, status.text, description, status.reason)

    def _limits(self) -> M.Limits:
        limits = self.limits
        return M.Limits(max_request_bytes=limits.max_request_bytes, max_response_bytes=self.max_response_bytes,
                        max_image_pixels=limits.max_image_pixels, max_tree_nodes=limits.max_tree_nodes, max_top_k=MAX_TOP_K,
                        max_concurrent_explanations=limits.max_concurrent, max_queued_explanations=limits.max_queue)

    # -- prediction -----------------------------------------------------------------------------
    def Predict(self, request: S.PredictRequest, context: grpc.ServicerContext, record: CallRecord) -> S.PredictResponse:
        query = messages.predict_from_proto(request)
        model = self._model(query.model, query.version, record)
        with self._slot(self.predictions, context):
            prediction = model.explainer.predict(query.inputs, query.top_k)
        self.metrics.engine.labels("Predict", model.name).observe(prediction.engine_seconds)
        return messages.prediction_proto(prediction)

    # -- explanations ---------------------------------------------------------------------------
    def Explain(self, request: S.ExplainRequest, context: grpc.ServicerContext, record: CallRecord) -> S.ExplainResponse:
        call = self._explain_call(messages.explain_from_proto(request), record)
        # The report shows the atlas's patches, as the CLI's does; a stale atlas fails before the work.
        atlas = call.model.explainer.atlas() if call.output.report else None
        result = self._explain(call, context, ExplainJob(call.inputs, call.options, on_level=self._counter(call),
                                                         should_stop=lambda: not context.is_active()))
        response = S.ExplainResponse(explanation=self._observed("Explain", call, result), engine_seconds=result.engine_seconds)
        if call.output.report:  # rendered outside the slot: it is encoding, not model work
            response.report_html = messages.report_html(result, atlas, self.max_response_bytes - response.ByteSize() - 16)
        return response

    def Expand(self, request: S.ExpandRequest, context: grpc.ServicerContext, record: CallRecord) -> S.ExpandResponse:
        # Recomputed from scratch (stateless, any replica answers): only the path, then the node's subtree.
        with embedded("request", own=("path",)):
            call = self._explain_call(messages.explain_from_proto(request.request), record, tuple(request.path))
            result = self._explain(call, context, ExplainJob(call.inputs, call.options, path=call.path,
                                                             on_level=self._counter(call),
                                                             should_stop=lambda: not context.is_active()))
        return S.ExpandResponse(explanation=self._observed("Expand", call, result), engine_seconds=result.engine_seconds)

    def ExplainStream(self, request: S.ExplainStreamRequest, context: grpc.ServicerContext,
                      record: CallRecord) -> Iterator[S.ExplainStreamResponse]:
        with embedded("request"):
            yield from self._explain_stream(self._explain_call(messages.explain_from_proto(request.request), record), context)

    def _explain_stream(self, call: ExplainCall, context: grpc.ServicerContext) -> Iterator[S.ExplainStreamResponse]:
        """Levels as the engine finishes them: the engine runs on a worker thread, this one sends."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                job = ExplainJob(call.inputs, call.options, on_level=self._counter(call, then=lambda *event: events.put(event)),
                                 should_stop=lambda: stop.is_set() or not context.is_active())
                events.put((None, [], self._explain(call, context, job)))
            except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread
                events.put((None, [], exc))

        threading.Thread(target=work, name="gap-explain-stream", daemon=True).start()
        try:
            yield from self._stream(call, events, context)
        finally:
            stop.set()

    def _stream(self, call: ExplainCall, events: queue.Queue, context: grpc.ServicerContext) -> Iterator[S.ExplainStreamResponse]:
        version, output, last_level = call.model.entry.version, call.output, 0
        while True:
            try:
                level, nodes, tree = events.get(timeout=STREAM_POLL_SECONDS)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(tree, BaseException):
                raise tree
            if level is None:  # done
                yield S.ExplainStreamResponse(level=last_level, summary=self._summary_of(call, tree))
                return
            last_level = level
            paths = {n.id: tree.path(n.id) for n in nodes}
            if level == 0:  # the root's map and children come with level 1
                header = messages.header_proto(tree, version, output)
                header.ClearField("probability")
                root = messages.node_proto(nodes[0], [], output, tree.input_hw, with_map=False, with_children=False)
                yield S.ExplainStreamResponse(level=0, nodes=[root], header=header)
                continue
            # Children are still being added by the engine: sent empty, rebuilt from parents.
            message = S.ExplainStreamResponse(level=level, nodes=[
                messages.node_proto(n, paths[n.id], output, tree.input_hw, with_children=False) for n in nodes])
            if level == 1:
                message.root.CopyFrom(messages.node_proto(tree.root, [], output, tree.input_hw))
            yield message

    def _summary_of(self, call: ExplainCall, result: Explanation) -> S.StreamSummary:
        self.metrics.engine.labels("ExplainStream", call.model.name).observe(result.engine_seconds)
        summary = S.StreamSummary(node_count=len(result.nodes), engine_seconds=result.engine_seconds)
        if result.probability is not None:
            summary.probability = result.probability
        for name, tensor in messages.cams_protos(result, call.output).items():
            summary.cams[name].CopyFrom(tensor)
        return summary

    # -- shared steps ---------------------------------------------------------------------------
    def _named(self, name: str, record: CallRecord) -> str:
        if not name:
            raise invalid("model", "is required: the name of a model (see ListModels)")
        record.model = name
        return name

    def _model(self, name: str, version: int, record: CallRecord) -> LoadedModel:
        return self.store.get(self._named(name, record), version)

    def _explain_call(self, query: messages.ExplainQuery, record: CallRecord, path: tuple[int, ...] = ()) -> ExplainCall:
        """Check the request before it queues for a slot (bad ones fail at once)."""
        model = self._model(query.model, query.version, record)
        options = query.options
        tree = replace(options, root_path=path, depth=len(path) + options.depth)  # what the engine computes
        tree.validate()
        limit = self.limits.max_tree_nodes
        if tree.worst_case_nodes(limit) > limit:
            raise ResourceLimitError(f"top_k={options.top_k} over {tree.depth} levels may produce more than {limit} "
                                     f"nodes; the limit is {limit} nodes per request")
        return ExplainCall(model, query.inputs, options, query.output, record, path)

    def _observed(self, rpc: str, call: ExplainCall, result: Explanation) -> pb.explanation.Explanation:
        self.metrics.engine.labels(rpc, call.model.name).observe(result.engine_seconds)
        return messages.explanation_proto(result, call.model.entry.version, call.output)

    def _counter(self, call: ExplainCall,
                 then: Callable[[int, list[Node], Explanation], None] | None = None):
        counter = self.metrics.nodes.labels(call.model.name)

        def on_level(level: int, nodes: list[Node], tree: Explanation) -> None:
            call.record.nodes += len(nodes)
            counter.inc(len(nodes))
            if then is not None:
                then(level, nodes, tree)

        return on_level

    def _explain(self, call: ExplainCall, context: grpc.ServicerContext, job: ExplainJob) -> Explanation:
        """One explanation through its model's batcher: alone, or with other queued requests of the model."""
        model = call.model
        batcher = self._batchers.get(model.explainer, lambda: Batcher(
            model.explainer, model.entry.config.dynamic_batching, self.explanations,
            self.metrics.batch_size.labels(model.name).observe))
        return batcher.explain(job, context.is_active, context.time_remaining)

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

    # -- channel atlas --------------------------------------------------------------------------
    def GetChannel(self, request: S.GetChannelRequest, context: grpc.ServicerContext, record: CallRecord) -> S.GetChannelResponse:
        # A lookup in the atlas the model loaded on first use: no computation slot needed.
        query = messages.channel_from_proto(request)
        model = self._model(query.model, query.version, record)
        entry = model.explainer.atlas(required=True).entry(query.layer, query.channel)
        return messages.channel_proto(entry, query.patches)
