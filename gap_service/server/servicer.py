"""GapService: a thin adapter. Per RPC: proto -> typed request -> one Explainer call -> proto.

Every method takes ``(request, context, record)`` and runs inside ``RpcGuard`` (errors.py),
which maps the domain exceptions raised below it to status codes; nothing here picks a status
code, validates a value or runs a model itself. A request of several inputs (``inputs``) is one
``Batcher.explain_many`` call (Predict: one ``Explainer.predict`` per input in one slot); the
first input that fails is the request's error, its field paths naming it (``inputs[3].image``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc

from ..cache import BuildOnce
from ..errors import CancelledError, FieldViolation, GapError, ResourceLimitError, exceeded, invalid
from ..explainer import Explainer, ExplainJob
from ..explanation import Explanation, Node
from ..inputs import Inputs
from ..options import MAX_TOP_K, ExplainOptions
from ..prediction import Prediction
from ..wire import messages, pb
from ..wire.messages import OutputOptions
from .batching import Batcher
from .errors import CallRecord, embedded
from .limits import Admission, ServerLimits, explain_response_bound
from .metrics import Metrics
from .store import LoadedModel, ModelStatus, ModelStore

S = pb.service
M = pb.model
STREAM_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class ExplainCall:
    """An Explain, ExplainStream or Expand request, decoded and checked, with its model."""

    model: LoadedModel
    inputs: tuple[Inputs, ...]  # one per input (a request's ``input``, or its ``inputs``)
    options: ExplainOptions
    output: OutputOptions
    record: CallRecord
    path: tuple[int, ...] = ()
    several: bool = False  # the request used ``inputs``: errors name inputs[i]


def raise_for_input(exc: Exception, index: int) -> NoReturn:
    """Raise input ``index``'s failure as the failure of a request of several inputs: its ``input...``
    field paths become ``inputs[index]...``, and an error about another field (a target out of range
    for this input) gets an ``inputs[index]`` violation first. Same class, so the same status code."""
    if isinstance(exc, CancelledError):  # the caller's doing, not the input's
        raise exc
    if not isinstance(exc, GapError):  # not the request's fault (INTERNAL): as it is, for the log
        exc.add_note(f"(inputs[{index}])")
        raise exc
    name = f"inputs[{index}]"
    violations = tuple(FieldViolation(name + v.field[len("input"):], v.description)
                       if v.field == "input" or v.field.startswith("input.") else v for v in exc.violations)
    if any(v.field.startswith(name) for v in violations):
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
    else:
        message = f"{name}: {exc.message}"
        named = ", ".join(v.field for v in violations)
        violations = (FieldViolation(name, f"its tree failed on {named}" if named else exc.message), *violations)
    renamed = type(exc).__new__(type(exc))
    renamed.__dict__.update(exc.__dict__)  # a subclass's own attributes (an UnsupportedOpError's ops)
    GapError.__init__(renamed, message, violations)
    raise renamed from exc


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
        # HTML reports (a thumbnail per node: seconds of CPU each) are rendered as many at a time as explanations run.
        self.reports = Admission("reports", limits.max_concurrent, limits.max_queue, metrics.pool_changed("report"))

    # -- description ----------------------------------------------------------------------------
    def ListModels(self, request: S.ListModelsRequest, context: grpc.ServicerContext, record: CallRecord) -> S.ListModelsResponse:
        return S.ListModelsResponse(models=[self._summary(status) for status in self.store.statuses()])

    def GetModel(self, request: S.GetModelRequest, context: grpc.ServicerContext, record: CallRecord) -> S.GetModelResponse:
        status = self.store.status(self._named(request.model, record), request.version)
        if status.model is None:  # unavailable: its state and reason
            return S.GetModelResponse(model=self._summary(status), limits=self._limits())
        model = status.model
        return messages.description_proto(model.description, self._summary(status), self._limits(), model.load_seconds,
                                          model.explainer.atlas_layers())

    def _summary(self, status: ModelStatus) -> M.ModelSummary:
        description = status.model.description if status.model else None
        return messages.summary_proto(status.name, status.version, status.versions, status.text, description, status.reason)

    def _limits(self) -> M.Limits:
        limits = self.limits
        return M.Limits(max_request_bytes=limits.max_request_bytes, max_response_bytes=self.max_response_bytes,
                        max_image_pixels=limits.max_image_pixels, max_tree_nodes=limits.max_tree_nodes, max_top_k=MAX_TOP_K,
                        max_concurrent_explanations=limits.max_concurrent, max_queued_explanations=limits.max_queue,
                        max_batch_inputs=limits.max_batch_inputs)

    # -- prediction -----------------------------------------------------------------------------
    def Predict(self, request: S.PredictRequest, context: grpc.ServicerContext, record: CallRecord) -> S.PredictResponse:
        query = messages.predict_from_proto(request)
        model = self._model(query.model, query.version, record)
        if not query.several:
            with self._slot(self.predictions, context):
                prediction = model.explainer.predict(query.inputs[0], query.top_k)
            self.metrics.engine.labels("Predict", model.name).observe(prediction.engine_seconds)
            return messages.prediction_proto(prediction)
        self.limits.check_inputs(len(query.inputs))
        with self._slot(self.predictions, context):  # one slot for the request's inputs, one after the other
            predictions = [self._predicted(model, inputs, query.top_k, index, context)
                           for index, inputs in enumerate(query.inputs)]
        response = messages.predictions_proto(predictions)
        self.metrics.engine.labels("Predict", model.name).observe(response.engine_seconds)
        return self._fitting(response, "predictions")

    def _predicted(self, model: LoadedModel, inputs: Inputs, top_k: int, index: int,
                   context: grpc.ServicerContext) -> Prediction:
        if not context.is_active():
            raise CancelledError("prediction cancelled by the caller")
        try:
            return model.explainer.predict(inputs, top_k)
        except Exception as exc:  # noqa: BLE001 - re-raised, naming its input
            raise_for_input(exc, index)

    def _fitting(self, response, what: str):
        """``response`` if it fits in the largest message the server sends, else a clear refusal."""
        size = response.ByteSize()
        if size > self.max_response_bytes:
            description = (f"the {what} take {size} bytes, more than the server's max_response_bytes "
                           f"({self.max_response_bytes}): send fewer inputs per request")
            raise exceeded("inputs", description)
        return response

    # -- explanations ---------------------------------------------------------------------------
    def Explain(self, request: S.ExplainRequest, context: grpc.ServicerContext, record: CallRecord) -> S.ExplainResponse:
        call = self._explain_call(messages.explain_from_proto(request), record)
        if call.several:
            return self._explain_several(call, context)
        # The report shows the atlas's patches, as the CLI's does; a stale atlas fails before the work.
        atlas = call.model.explainer.atlas() if call.output.report else None
        result = self._explain(call, context, ExplainJob(call.inputs[0], call.options, on_level=self._counter(call),
                                                         should_stop=lambda: not context.is_active()))
        response = S.ExplainResponse(explanation=self._observed("Explain", call, result), engine_seconds=result.engine_seconds)
        if call.output.report:
            with self._slot(self.reports, context):
                response.report_html = messages.report_html(result, atlas, self.max_response_bytes - response.ByteSize() - 16)
        return response

    def _explain_several(self, call: ExplainCall, context: grpc.ServicerContext) -> S.ExplainResponse:
        if call.output.report:
            raise invalid("output.report", "a request of several inputs has no report: ask for each input's report "
                                           "with input, or render the explanations' reports client side")
        bound = explain_response_bound(call.model.description, call.options, call.output, len(call.inputs))
        if bound > self.max_response_bytes:  # before any work: the trees could not be sent
            description = (f"{len(call.inputs)} trees of top_k={call.options.top_k} over {call.options.depth} levels with "
                           f"these output options may take {bound} bytes, more than the server's max_response_bytes "
                           f"({self.max_response_bytes}): send fewer inputs, or ask for float16 maps, map_levels or omit_maps")
            raise exceeded("inputs", description)
        jobs = [ExplainJob(inputs, call.options, on_level=self._counter(call), should_stop=lambda: not context.is_active())
                for inputs in call.inputs]
        results = self._explain_all(call, context, jobs)
        seconds = self._engine_seconds(results)
        self.metrics.engine.labels("Explain", call.model.name).observe(seconds)
        version = call.model.entry.version
        response = S.ExplainResponse(explanations=[messages.explanation_proto(r, version, call.output) for r in results],
                                     engine_seconds=seconds)
        return self._fitting(response, "explanations")

    @staticmethod
    def _engine_seconds(results: Sequence[Explanation]) -> float:
        """The engine time of the runs that computed ``results``: the trees of one run share its time."""
        return sum(dict.fromkeys(r.engine_seconds for r in results))

    def Expand(self, request: S.ExpandRequest, context: grpc.ServicerContext, record: CallRecord) -> S.ExpandResponse:
        # Recomputed from scratch (stateless, any replica answers): only the path, then the node's subtree.
        with embedded("request", own=("path",)):
            call = self._explain_call(messages.explain_from_proto(request.request), record, tuple(request.path))
            if call.several:
                raise invalid("inputs", "Expand takes one input: set input, not inputs")
            result = self._explain(call, context, ExplainJob(call.inputs[0], call.options, path=call.path,
                                                             on_level=self._counter(call),
                                                             should_stop=lambda: not context.is_active()))
        return S.ExpandResponse(explanation=self._observed("Expand", call, result), engine_seconds=result.engine_seconds)

    def ExplainStream(self, request: S.ExplainStreamRequest, context: grpc.ServicerContext,
                      record: CallRecord) -> Iterator[S.ExplainStreamResponse]:
        with embedded("request"):
            yield from self._explain_stream(self._explain_call(messages.explain_from_proto(request.request), record), context)

    def _explain_stream(self, call: ExplainCall, context: grpc.ServicerContext) -> Iterator[S.ExplainStreamResponse]:
        """Levels as the engine finishes them: the engine runs on a worker thread, this one sends.
        Events are (input, level, nodes, tree); the last one (input None) holds the finished trees."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def reporter(index: int) -> Callable[[int, list[Node], Explanation], None]:
            return lambda level, nodes, tree: events.put((index, level, nodes, tree))

        def work() -> None:
            try:
                jobs = [ExplainJob(inputs, call.options, on_level=self._counter(call, then=reporter(index)),
                                   should_stop=lambda: stop.is_set() or not context.is_active())
                        for index, inputs in enumerate(call.inputs)]
                events.put((None, None, [], self._explain_all(call, context, jobs)))
            except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread
                events.put((None, None, [], exc))

        threading.Thread(target=work, name="gap-explain-stream", daemon=True).start()
        try:
            yield from self._stream(call, events, context)
        finally:
            stop.set()

    def _stream(self, call: ExplainCall, events: queue.Queue, context: grpc.ServicerContext) -> Iterator[S.ExplainStreamResponse]:
        version, output = call.model.entry.version, call.output
        last_level = [0] * len(call.inputs)
        while True:
            try:
                index, level, nodes, tree = events.get(timeout=STREAM_POLL_SECONDS)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(tree, BaseException):
                raise tree
            if index is None:  # done: each tree's summary, in input order
                self.metrics.engine.labels("ExplainStream", call.model.name).observe(self._engine_seconds(tree))
                for number, result in enumerate(tree):
                    yield S.ExplainStreamResponse(level=last_level[number], summary=self._summary_of(call, result),
                                                  input=number)
                return
            last_level[index] = level
            paths = {n.id: tree.path(n.id) for n in nodes}
            if level == 0:  # the root's map and children come with level 1
                header = messages.header_proto(tree, version, output)
                header.ClearField("probability")
                root = messages.node_proto(nodes[0], [], output, tree.input_hw, with_map=False, with_children=False)
                yield S.ExplainStreamResponse(level=0, nodes=[root], header=header, input=index)
                continue
            # Children are still being added by the engine: sent empty, rebuilt from parents.
            message = S.ExplainStreamResponse(level=level, input=index, nodes=[
                messages.node_proto(n, paths[n.id], output, tree.input_hw, with_children=False) for n in nodes])
            if level == 1:
                message.root.CopyFrom(messages.node_proto(tree.root, [], output, tree.input_hw))
            yield message

    def _summary_of(self, call: ExplainCall, result: Explanation) -> S.StreamSummary:
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
        if query.several:
            self.limits.check_inputs(len(query.inputs))
        return ExplainCall(model, query.inputs, options, query.output, record, path, query.several)

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
        return self._batcher(call.model).explain(job, context.is_active, context.time_remaining)

    def _explain_all(self, call: ExplainCall, context: grpc.ServicerContext, jobs: list[ExplainJob]) -> list[Explanation]:
        """The call's jobs through its model's batcher, together (one for a request of one input); the
        first that fails is the call's failure, naming its input when the request has several."""
        if not call.several:
            return [self._explain(call, context, jobs[0])]
        results = self._batcher(call.model).explain_many(jobs, context.is_active, context.time_remaining)
        for index, result in enumerate(results):
            if isinstance(result, Exception):
                raise_for_input(result, index)
        return results  # type: ignore[return-value]

    def _batcher(self, model: LoadedModel) -> Batcher:
        return self._batchers.get(model.explainer, lambda: Batcher(
            model.explainer, model.entry.config.dynamic_batching, self.explanations,
            self.metrics.batch_size.labels(model.name).observe))

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
