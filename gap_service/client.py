"""Python client of gap.v1.GapService.

    from gap_service.client import GapClient
    with GapClient("localhost:50051") as client:
        print([m.name for m in client.list_models()])
        explanation = client.explain("ppocr_cls", image="line.png", depth=3, top_k=5)
        for level, nodes in client.explain_stream("ppocr_cls", image="line.png"):
            ...

``explain`` and ``expand`` return ``gap_service.explanation.Explanation`` objects rebuilt from
the response (maps from the raw tensors), so everything that works on a local explanation (the
HTML report, ``path``, ``upsampled``) works on a remote one. The raw stub is ``client.stub``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from .explanation import Explanation, Node
from .server import convert, pb

S = pb.service
E = pb.explanation

# The retry story (docs/deploy.md). The channel's gRPC retry policy replays UNAVAILABLE (a replica
# starting or draining, one that died mid-call behind nginx, none reachable) and CANCELLED sent by a
# server (a replica that stopped while the call waited to be dispatched) on a fresh attempt, which
# the load balancer sends to another replica. A call the caller cancels itself is never retried.
# Every gap.v1.GapService RPC is read-only, so a replay is safe.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
SERVICE_CONFIG = {
    "methodConfig": [{"name": [{"service": "gap.v1.GapService"}], "retryPolicy": RETRY_POLICY}],
}


def service_config(round_robin: bool = False, health_check: bool = False) -> dict:
    """The service config: the retry policy, and for client-side balancing round_robin over every
    resolved address, optionally skipping those whose grpc.health.v1 Watch says NOT_SERVING."""
    config = json.loads(json.dumps(SERVICE_CONFIG))
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    return config


def channel_options(round_robin: bool = False, health_check: bool = False) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", json.dumps(service_config(round_robin, health_check))),
        ("grpc.enable_retries", 1),
        # A retry replays the request from the client's buffer: room for a few Explain requests.
        ("grpc.per_rpc_retry_buffer_size", 8 * 2**20),
        ("grpc.retry_buffer_size", 64 * 2**20),
    ]


def retryable(exc: grpc.RpcError) -> bool:
    """Whether a read-only call that failed this way is worth replaying (on another replica).

    UNAVAILABLE, and CANCELLED that the caller did not ask for: the channel's retry policy already
    replayed these up to maxAttempts; this is the caller's last resort. INTERNAL with a stream reset:
    a replica died after it had started to answer and the proxy cut the stream; the call was
    committed, so gRPC's retry policy may not replay it, but the caller may. Any other status is
    an answer.
    """
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (exc.details() or "")


T = TypeVar("T")


def with_replays(call: Callable[[], T], replays: int = 2, backoff: float = 0.25) -> T:
    """Run a unary call, replaying it up to ``replays`` times (backoff doubling) when ``retryable``."""
    for attempt in range(replays + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            if attempt == replays or not retryable(exc):
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Keepalive that survives load balancers: ping every 30 s (the server accepts down to 10 s).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

ImageSource = bytes | str | Path


@dataclass
class Prediction:
    logits: np.ndarray
    classes: list[tuple[int, str, float, float]]  # (index, label, logit, probability), best first
    engine_seconds: float


@dataclass
class StreamLevel:
    """One message of ExplainStream: the level's new nodes and the tree assembled so far."""

    level: int
    nodes: list[Node]
    explanation: Explanation
    done: bool = False


@dataclass
class Expansion:
    """The subtree of an Expand: ``explanation.nodes[0]`` is the expanded node at ``path``."""

    explanation: Explanation
    path: list[int]
    paths: dict[int, list[int]] = field(default_factory=dict)  # node id -> channels from the decision


def make_input(image: ImageSource | None = None, tensor: np.ndarray | None = None, input_name: str = "") -> pb.service.Input:
    if (image is None) == (tensor is None):
        raise ValueError("pass exactly one of image (encoded bytes or a file path) or tensor (numpy array)")
    if image is not None:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return S.Input(image=data)
    return S.Input(tensor=convert.to_tensor(np.asarray(tensor), name=input_name))


def make_options(layers: Sequence[str] | None = None, target: int | None = None, top_k: int | None = None,
                 depth: int | None = None, min_share: float = 0.0, score: str | None = None) -> pb.explanation.ExplainOptions:
    options = E.ExplainOptions(layers=list(layers or ()), min_share=min_share)
    if target is not None:
        options.target = target
    if top_k is not None:
        options.top_k = top_k
    if depth is not None:
        options.depth = depth
    if score is not None:
        options.score = convert.SCORE_ENUMS[score]
    return options


def make_output(map_dtype: str = "float32", heatmaps: bool = False, cams: bool = False, picture: bool = False,
                omit_maps: bool = False) -> pb.explanation.OutputOptions:
    return E.OutputOptions(map_dtype=convert.dtype_code(np.dtype(map_dtype)), heatmaps=heatmaps, cams=cams,
                           picture=picture, omit_maps=omit_maps)


class GapClient:
    """A connection to a gap-service server; thread-safe; close() or use as a context manager."""

    def __init__(self, target: str, *, timeout: float | None = 120.0, channel: grpc.Channel | None = None,
                 options: Sequence[tuple[str, object]] = (), balance: bool = False, replays: int = 2) -> None:
        """``target``: HOST:PORT, or several (``ipv4:a:1,b:2``, ``dns:///name:port``) with
        ``balance=True`` for client-side round_robin over healthy replicas. ``replays``: extra
        attempts of a unary call after a ``retryable`` failure (on top of the channel's policy)."""
        self.target = target
        self.timeout = timeout
        self.replays = replays
        merged = dict([*CLIENT_OPTIONS, *channel_options(round_robin=balance, health_check=balance)])
        merged.update(dict(options))  # the caller's options win over the defaults, key by key
        self.channel = channel or grpc.insecure_channel(target, options=list(merged.items()))
        self.stub = pb.service_grpc.GapServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GapClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method, request, timeout: float | None):
        return with_replays(lambda: method(request, timeout=self._timeout(timeout)), self.replays)

    # -- health ---------------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... of grpc.health.v1 for ``service`` ('' = the server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        response = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        last: Exception | str | None = None
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{self.target} is not SERVING after {timeout} s (last: {last})")

    # -- models ---------------------------------------------------------------------------------
    def list_models(self, timeout: float | None = None) -> list[pb.model.ModelSummary]:
        return list(self._unary(self.stub.ListModels, S.ListModelsRequest(), timeout).models)

    def get_model(self, model: str, version: int = 0, timeout: float | None = None) -> pb.service.GetModelResponse:
        return self._unary(self.stub.GetModel, S.GetModelRequest(model=model, version=version), timeout)

    def predict(self, model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                top_k: int | None = None, version: int = 0, timeout: float | None = None) -> Prediction:
        request = S.PredictRequest(model=model, version=version, input=make_input(image, tensor))
        if top_k is not None:
            request.top_k = top_k
        response = self._unary(self.stub.Predict, request, timeout)
        return Prediction(convert.from_tensor(response.logits, "logits"),
                          [(c.index, c.label, c.logit, c.probability) for c in response.classes], response.engine_seconds)

    # -- explanations ---------------------------------------------------------------------------
    def explain_request(self, model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                        version: int = 0, layers: Sequence[str] | None = None, target: int | None = None,
                        top_k: int | None = None, depth: int | None = None, min_share: float = 0.0,
                        score: str | None = None, map_dtype: str = "float32", heatmaps: bool = False,
                        cams: bool = False, picture: bool = False, omit_maps: bool = False) -> pb.service.ExplainRequest:
        return S.ExplainRequest(
            model=model, version=version, input=make_input(image, tensor),
            options=make_options(layers, target, top_k, depth, min_share, score),
            output=make_output(map_dtype, heatmaps, cams, picture, omit_maps),
        )

    def explain(self, model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                timeout: float | None = None, **options) -> Explanation:
        """The whole tree (see ``explain_request`` for the options)."""
        request = self.explain_request(model, image, tensor, **options)
        response = self._unary(self.stub.Explain, request, timeout)
        return convert.explanation_from_proto(response.explanation)

    def explain_stream(self, model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                       timeout: float | None = None, **options) -> Iterator[StreamLevel]:
        """Levels as the server computes them; the last item (``done``) holds the finished tree.

        Breaking out of the loop cancels the call (the server stops computing).
        """
        base = self.explain_request(model, image, tensor, **options)
        request = S.ExplainStreamRequest(model=base.model, version=base.version, input=base.input,
                                         options=base.options, output=base.output)
        call = self.stub.ExplainStream(request, timeout=self._timeout(timeout))
        tree: Explanation | None = None
        try:
            for message in call:
                if message.HasField("header"):
                    tree = convert.explanation_from_proto(message.header)
                assert tree is not None, "the first ExplainStream message carries the header"
                if message.HasField("root"):
                    tree.nodes[0] = convert.node_from_proto(message.root)
                if message.HasField("summary"):
                    summary = message.summary
                    tree.probability = summary.probability if summary.HasField("probability") else None
                    tree.cams = {name: convert.from_tensor(t).astype(np.float32) for name, t in summary.cams.items()}
                    yield StreamLevel(message.level, [], tree, done=True)
                    continue
                nodes = [convert.node_from_proto(n) for n in message.nodes]
                for node in nodes:
                    if node.id != len(tree.nodes):
                        raise ValueError(f"stream out of order: node {node.id} after {len(tree.nodes)} nodes")
                    tree.nodes.append(node)
                    if node.parent is not None and node.id not in tree.nodes[node.parent].children:
                        tree.nodes[node.parent].children.append(node.id)
                yield StreamLevel(message.level, nodes, tree)
        finally:
            call.cancel()  # no-op once finished; stops the server when the caller broke off early

    def expand(self, model: str, path: Sequence[int], image: ImageSource | None = None, tensor: np.ndarray | None = None,
               *, timeout: float | None = None, **options) -> Expansion:
        """The subtree below the node at ``path`` (channels from the root), top_k/depth for the subtree."""
        base = self.explain_request(model, image, tensor, **options)
        request = S.ExpandRequest(model=base.model, version=base.version, input=base.input, options=base.options,
                                  output=base.output, path=list(path))
        response = self._unary(self.stub.Expand, request, timeout)
        paths = {n.id: list(n.path) for n in response.explanation.nodes}
        return Expansion(convert.explanation_from_proto(response.explanation), list(path), paths)
