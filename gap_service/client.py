"""Python client of gap.v1.GapService.

    from gap_service.client import GapClient
    with GapClient("localhost:50051") as client:
        print([m.name for m in client.list_models()])
        explanation = client.explain("ppocr_cls", image="line.png", depth=3, top_k=5)
        for level, nodes in client.explain_stream("ppocr_cls", image="line.png"):
            ...

    # TLS (the server's CA), mTLS (a client certificate) and an API key: docs/security.md
    GapClient("gap.example.com:8443", root_certificates=Path("ca.crt"), client_cert=Path("client.crt"),
              client_key=Path("client.key"), token=os.environ["GAP_TOKEN"])

``explain`` and ``expand`` return ``gap_service.explanation.Explanation`` objects rebuilt from
the response (maps from the raw tensors), so everything that works on a local explanation (the
HTML report, ``path``, ``upsampled``) works on a remote one. The raw stub is ``client.stub``.

Several inputs per call (``inputs``: images as bytes or paths, tensors as numpy arrays, mixed as
you like; at most ``GetModel``'s ``limits.max_batch_inputs``): ``predict_many`` and
``explain_many`` return one result per input, in order; ``explain_stream(model, inputs=[...])``
yields each input's levels as the server computes them, ``StreamLevel.input`` saying whose::

    trees = client.explain_many("ppocr_cls", ["a.png", "b.png", array], depth=3, top_k=5)
    for level in client.explain_stream("ppocr_cls", inputs=["a.png", "b.png"]):
        print(level.input, level.level, len(level.nodes))
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from .atlas import ChannelEntry
from .explanation import Explanation, Node
from .options import ExplainOptions
from .prediction import Prediction
from .wire import messages, pb
from .wire.messages import OutputOptions, input_to_proto, inputs_to_proto
from .wire.tensors import from_tensor

S = pb.service
_OPTION_FIELDS = set(ExplainOptions.__dataclass_fields__)
_OUTPUT_FIELDS = set(OutputOptions.__dataclass_fields__)

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


def bad_request(status: grpc.Call | grpc.RpcError) -> list[tuple[str, str]]:
    """Field violations of an error status (client side helper): [(field, description)]."""
    decoded = rpc_status.from_call(status)  # type: ignore[arg-type]
    if decoded is None:
        return []
    found = []
    for detail in decoded.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            found.extend((v.field, v.description) for v in request.field_violations)
    return found


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
Pem = bytes | str | Path  # PEM contents (bytes), or the path of a PEM file


def _pem(value: Pem | None) -> bytes | None:
    return value if value is None or isinstance(value, bytes) else Path(value).read_bytes()


def channel_credentials(*, tls: bool = False, root_certificates: Pem | None = None, client_cert: Pem | None = None,
                        client_key: Pem | None = None, token: str | None = None) -> grpc.ChannelCredentials | None:
    """The credentials of a channel to gap-service, or None for plaintext (docs/security.md).

    Any argument means TLS: the server's certificate is checked against ``root_certificates`` (default:
    the system's roots); ``client_cert`` and ``client_key`` answer a server that requires mTLS;
    ``token``, an API key, goes as ``authorization: Bearer`` with every call, over TLS only (gRPC never
    sends call credentials in cleartext).
    """
    if not (tls or root_certificates or client_cert or client_key or token):
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (mTLS)")
    credentials = grpc.ssl_channel_credentials(_pem(root_certificates), _pem(client_key), _pem(client_cert))
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials


@dataclass
class StreamLevel:
    """One message of ExplainStream: the level's new nodes and the tree assembled so far. With
    several inputs, ``input`` is the index of the input whose tree it is (0 otherwise); each input's
    last item is ``done`` and holds its finished tree."""

    level: int
    nodes: list[Node]
    explanation: Explanation
    done: bool = False
    input: int = 0


@dataclass
class Expansion:
    """The subtree of an Expand: ``explanation.nodes[0]`` is the expanded node at ``path``."""

    explanation: Explanation
    path: list[int]
    paths: dict[int, list[int]] = field(default_factory=dict)  # node id -> channels from the decision


InputItem = ImageSource | np.ndarray  # one of several inputs: an encoded image (bytes, a path) or a tensor


def explain_request(model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                    inputs: Sequence[InputItem] | None = None, version: int = 0, options: ExplainOptions | None = None,
                    output: OutputOptions | None = None, **fields: object) -> pb.service.ExplainRequest:
    """An ExplainRequest of one input (``image`` or ``tensor``) or several (``inputs``); ``fields`` set
    single ExplainOptions or OutputOptions fields (``top_k=3, heatmaps=True, map_levels=1``)."""
    unknown = set(fields) - _OPTION_FIELDS - _OUTPUT_FIELDS
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; they are the fields of ExplainOptions and OutputOptions")
    options = replace(options or ExplainOptions(), **{k: v for k, v in fields.items() if k in _OPTION_FIELDS})
    if options.layers is not None:
        options = replace(options, layers=tuple(options.layers))
    output = replace(output or OutputOptions(), **{k: v for k, v in fields.items() if k in _OUTPUT_FIELDS})
    request = S.ExplainRequest(model=model, version=version, options=messages.options_to_proto(options),
                               output=messages.output_to_proto(output))
    if inputs is not None:
        if image is not None or tensor is not None:
            raise ValueError("pass one input (image or tensor) or several (inputs), not both")
        request.inputs.extend(inputs_to_proto(inputs))
    else:
        request.input.CopyFrom(input_to_proto(image, tensor))
    return request


def _one_input(method: str, options: dict) -> None:
    if "inputs" in options:
        raise TypeError(f"{method} takes one input (image or tensor)"
                        + ("; explain_many takes several" if method == "explain" else ""))


class GapClient:
    """A connection to a gap-service server; thread-safe; close() or use as a context manager."""

    def __init__(self, target: str, *, timeout: float | None = 120.0, channel: grpc.Channel | None = None,
                 options: Sequence[tuple[str, object]] = (), balance: bool = False, replays: int = 2,
                 tls: bool = False, root_certificates: Pem | None = None, client_cert: Pem | None = None,
                 client_key: Pem | None = None, token: str | None = None) -> None:
        """``target``: HOST:PORT, or several (``ipv4:a:1,b:2``, ``dns:///name:port``) with
        ``balance=True`` for client-side round_robin over healthy replicas. ``replays``: extra
        attempts of a unary call after a ``retryable`` failure (on top of the channel's policy).
        ``tls``, ``root_certificates``, ``client_cert``, ``client_key``, ``token``: see
        ``channel_credentials`` (plaintext when none is given)."""
        self.target = target
        self.timeout = timeout
        self.replays = replays
        merged = dict([*CLIENT_OPTIONS, *channel_options(round_robin=balance, health_check=balance)])
        merged.update(dict(options))  # the caller's options win over the defaults, key by key
        credentials = channel_credentials(tls=tls, root_certificates=root_certificates, client_cert=client_cert,
                                          client_key=client_key, token=token)
        if channel is None:
            settings = list(merged.items())
            channel = (grpc.secure_channel(target, credentials, options=settings) if credentials
                       else grpc.insecure_channel(target, options=settings))
        self.channel = channel
        self.stub = pb.service_grpc.GapServiceStub(self.channel)

    explain_request = staticmethod(explain_request)

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
        request = S.PredictRequest(model=model, version=version, input=input_to_proto(image, tensor))
        if top_k is not None:
            request.top_k = top_k
        return messages.prediction_from_proto(self._unary(self.stub.Predict, request, timeout))

    def predict_many(self, model: str, inputs: Sequence[InputItem], *, top_k: int | None = None, version: int = 0,
                     timeout: float | None = None) -> list[Prediction]:
        """One Predict call for several inputs (images and tensors): one Prediction per input, in order."""
        request = S.PredictRequest(model=model, version=version, inputs=inputs_to_proto(inputs))
        if top_k is not None:
            request.top_k = top_k
        response = self._unary(self.stub.Predict, request, timeout)
        return [messages.prediction_from_proto(result) for result in response.results]

    # -- explanations ---------------------------------------------------------------------------
    def explain(self, model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                timeout: float | None = None, **options) -> Explanation:
        """The whole tree (see ``explain_request`` for the options)."""
        _one_input("explain", options)
        response = self._unary(self.stub.Explain, explain_request(model, image, tensor, **options), timeout)
        return messages.explanation_from_proto(response.explanation)

    def explain_many(self, model: str, inputs: Sequence[InputItem], *, timeout: float | None = None,
                     **options) -> list[Explanation]:
        """One Explain call for several inputs (images and tensors), the same options for all: one tree
        per input, in order, each what ``explain`` returns for it alone."""
        response = self._unary(self.stub.Explain, explain_request(model, inputs=inputs, **options), timeout)
        return [messages.explanation_from_proto(tree) for tree in response.explanations]

    def explain_stream(self, model: str, image: ImageSource | None = None, tensor: np.ndarray | None = None, *,
                       inputs: Sequence[InputItem] | None = None, timeout: float | None = None,
                       **options) -> Iterator[StreamLevel]:
        """Levels as the server computes them; the last item (``done``) holds the finished tree. With
        ``inputs``, every input's levels, interleaved as computed (``StreamLevel.input`` says whose),
        and one ``done`` item per input.

        Breaking out of the loop cancels the call (the server stops computing).
        """
        request = S.ExplainStreamRequest(request=explain_request(model, image, tensor, inputs=inputs, **options))
        call = self.stub.ExplainStream(request, timeout=self._timeout(timeout))
        trees: dict[int, Explanation] = {}
        try:
            for message in call:
                if message.HasField("header"):
                    trees[message.input] = messages.explanation_from_proto(message.header)
                tree = trees.get(message.input)
                if tree is None:
                    raise ValueError(f"stream out of order: input {message.input}'s first message has no header")
                if message.HasField("root"):
                    tree.nodes[0] = messages.node_from_proto(message.root)
                if message.HasField("summary"):
                    summary = message.summary
                    tree.probability = summary.probability if summary.HasField("probability") else None
                    tree.cams = {name: from_tensor(t).astype(np.float32) for name, t in summary.cams.items()}
                    yield StreamLevel(message.level, [], tree, done=True, input=message.input)
                    continue
                nodes = [messages.node_from_proto(n) for n in message.nodes]
                for node in nodes:
                    if node.id != len(tree.nodes):
                        raise ValueError(f"stream out of order: node {node.id} after {len(tree.nodes)} nodes")
                    tree.nodes.append(node)
                    if node.parent is not None and node.id not in tree.nodes[node.parent].children:
                        tree.nodes[node.parent].children.append(node.id)
                yield StreamLevel(message.level, nodes, tree, input=message.input)
        finally:
            call.cancel()  # no-op once finished; stops the server when the caller broke off early

    def expand(self, model: str, path: Sequence[int], image: ImageSource | None = None, tensor: np.ndarray | None = None,
               *, timeout: float | None = None, **options) -> Expansion:
        """The subtree below the node at ``path`` (channels from the root), top_k/depth for the subtree."""
        _one_input("expand", options)
        request = S.ExpandRequest(request=explain_request(model, image, tensor, **options), path=list(path))
        response = self._unary(self.stub.Expand, request, timeout)
        paths = {n.id: list(n.path) for n in response.explanation.nodes}
        return Expansion(messages.explanation_from_proto(response.explanation), list(path), paths)

    # -- channel atlas --------------------------------------------------------------------------
    def get_channel(self, model: str, layer: str, channel: int, *, patches: bool = False, version: int = 0,
                    timeout: float | None = None) -> ChannelEntry:
        """What a node's channel responds to, from the server's atlas: statistics and patch boxes, and
        with ``patches`` their pixels too (otherwise ``pixels`` is empty, and the answer a few hundred bytes)."""
        request = S.GetChannelRequest(model=model, version=version, layer=layer, channel=channel, patches=patches)
        return messages.channel_from_response(self._unary(self.stub.GetChannel, request, timeout))
