"""Server lifecycle: bind, load and warm up the models, serve, drain on SIGTERM, exit 0.

States: starting (health NOT_SERVING, GapService calls UNAVAILABLE) -> serving (SERVING) ->
draining (NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish within the grace period).
With an HTTP port, the HTTP/JSON gateway (http.py) reaches the same gRPC server through a private
unix socket, so it follows the same states (its new requests get 503 once the drain starts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..repository import BUNDLED_REPOSITORY
from ..runtime import CUDA, RuntimeConfig, available_providers
from ..wire import pb
from . import reflection
from .errors import RpcGuard, lenient_deserializer
from .health import Health
from .http import HttpGateway
from .limits import ServerLimits
from .metrics import Metrics
from .security import AuthInterceptor, TlsFiles, api_keys
from .servicer import GapServicer
from ..state_cache import DEFAULT_STATE_CACHE_BYTES
from .store import ModelStore

log = logging.getLogger("gap_service.server")

MAX_GRPC_MESSAGE = 2**31 - 1
CHEAP_RPC_THREADS = 32  # threads left for ListModels/GetModel/health while every slot and queue place is taken


@dataclass
class ServeConfig:
    repository: Path = BUNDLED_REPOSITORY
    host: str = "127.0.0.1"  # local runs stay local; the images and Kubernetes bind all interfaces explicitly
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090  # 0: a free port; negative: no metrics server
    health_port: int = -1  # a plaintext grpc.health.v1-only port for probes that cannot speak TLS; negative: none
    http_port: int | None = None  # the HTTP/JSON gateway and the explorer page on host; 0: a free port; None/negative: none
    tls: TlsFiles | None = None  # TLS on the gRPC port (mTLS when it has a client CA)
    api_keys: str | None = None  # a JSON key file or env:NAME: every GapService call needs a key
    reflection: bool = True
    models: tuple[str, ...] = ()
    limits: ServerLimits = field(default_factory=ServerLimits)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    grace_seconds: float = 30.0
    warmup: bool = True
    strict: bool = False  # any model that fails to load stops the start (Triton's exit-on-error)
    state_cache_bytes: int = DEFAULT_STATE_CACHE_BYTES  # the replica's forward-state cache for Expand; 0: none


def default_concurrency(runtime: RuntimeConfig) -> tuple[int, int]:
    """(explanations at once, intra-op threads per session) sized to the machine."""
    cpus = os.cpu_count() or 1
    requested = [p if isinstance(p, str) else p[0] for p in (runtime.providers or ())]
    gpu = CUDA in available_providers() and (not requested or CUDA in requested)
    concurrent = 4 if gpu else max(1, cpus // 4)
    return concurrent, max(1, cpus // concurrent)


def server_options(limits: ServerLimits, max_response_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", min(max_response_bytes, MAX_GRPC_MESSAGE)),
        ("grpc.max_receive_message_length", min(limits.max_request_bytes, MAX_GRPC_MESSAGE)),
        # Keepalive that survives load balancers and NATs: ping idle connections every 60 s (below
        # the usual 350 s+ idle timeouts), drop peers that do not answer in 20 s, and accept client
        # pings down to every 10 s (clients of gap_service.client ping every 30 s).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Rebalance long-lived connections across replicas; let running explanations finish first.
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 5 * 60_000),
        ("grpc.so_reuseport", 0),
    ]


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    return bound


def _tls_mode(tls: TlsFiles | None) -> str:
    return "off" if tls is None else "mtls" if tls.client_ca else "tls"


class Lifecycle:
    """State and in-flight count, for RpcGuard and the drain."""

    def __init__(self) -> None:
        self.state = "starting"
        self._in_flight = 0
        self._idle = threading.Condition()
        self.metrics: Metrics | None = None

    def refusal(self) -> str | None:
        if self.state == "starting":
            return "the server is starting: models are loading"
        if self.state == "draining":
            return "the server is shutting down; retry on another replica"
        return None

    def enter(self) -> None:
        with self._idle:
            self._in_flight += 1
            self._report()

    def exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._report()
            self._idle.notify_all()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.set(self._in_flight)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True


class GapServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.health = Health()
        self.lifecycle = Lifecycle()
        self.lifecycle.metrics = self.metrics
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.Server | None = None
        self._health_server: grpc.Server | None = None
        self._gateway: HttpGateway | None = None
        self._gateway_dir: Path | None = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Scan the repository, bind and start answering (health NOT_SERVING until ``load``)."""
        config = self.config
        keys = api_keys(config.api_keys) if config.api_keys else None  # bad key or certificate files stop the start
        credentials = config.tls.credentials() if config.tls else None
        self.store = ModelStore(config.repository, config.runtime, config.models or None, config.limits.max_image_pixels,
                                strict=config.strict, state_cache_bytes=config.state_cache_bytes)
        self.store.prepare_all()  # compile only (fast): the layer shapes size the messages
        limits = config.limits
        workers = (limits.max_concurrent + limits.max_queue + limits.max_concurrent_predict
                   + limits.max_queue_predict + CHEAP_RPC_THREADS)
        self._workers = workers
        bound = max(m.response_bytes_bound(limits.max_tree_nodes) for m in self.store.prepared.values())
        self._max_response = min(bound, MAX_GRPC_MESSAGE)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gap-rpc"),
            options=server_options(limits, self._max_response),
            maximum_concurrent_rpcs=workers,
            interceptors=[AuthInterceptor(keys, self.metrics)] if keys else [],
        )
        self._server = server
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        self._servicer = None
        server.add_generic_rpc_handlers((self._handlers(),))
        if config.reflection:
            reflection.enable(server, (pb.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        self.port = _bind(server, config.host, config.port, credentials)
        if config.http_port is not None and config.http_port >= 0:
            # The gateway's own way in: a unix socket in a private folder (mode 0700), so the HTTP
            # port's calls meet the same interceptors, limits and lifecycle without a network port.
            self._gateway_dir = Path(tempfile.mkdtemp(prefix="gap-gateway-"))
            gateway_target = f"unix:{self._gateway_dir / 'grpc.sock'}"
            if not server.add_insecure_port(gateway_target):
                raise OSError(f"cannot listen on {gateway_target} (the HTTP gateway's channel)")
            self._gateway = HttpGateway(gateway_target, limits.max_request_bytes, tls=config.tls)
        if config.health_port >= 0:
            self._health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="gap-health"))
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_server)
            self.health_port = _bind(self._health_server, config.host, config.health_port, None)
            self._health_server.start()
        server.start()
        if self._gateway is not None:
            self.http_port = self._gateway.start(config.host, config.http_port)
        if config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(config.metrics_port, config.metrics_host)
        if keys and not config.tls:
            log.warning("API keys without TLS: keys and requests travel in cleartext (fine behind a TLS-terminating "
                        "proxy or mesh on a trusted network only)")
        log.info("listening", extra={"fields": {
            "host": config.host, "port": self.port, "metrics_host": config.metrics_host, "metrics_port": self.metrics_port,
            "health_port": self.health_port, "http_port": self.http_port, "tls": _tls_mode(config.tls), "api_keys": bool(keys),
            "reflection": config.reflection,
            "repository": str(config.repository), "max_concurrent": limits.max_concurrent, "max_queue": limits.max_queue,
            "threads": config.runtime.threads, "grpc_workers": workers,
        }})
        return self.port

    def _handlers(self) -> grpc.GenericRpcHandler:
        guard = RpcGuard(self.lifecycle, self.metrics)
        service = pb.service.DESCRIPTOR.services_by_name["GapService"]
        handlers = {}
        for method in service.methods:
            request_type = message_factory.GetMessageClass(method.input_type)
            response_type = message_factory.GetMessageClass(method.output_type)
            implementation = self._dispatch(method.name)
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    guard.stream(method.name, implementation),
                    request_deserializer=lenient_deserializer(request_type),
                    response_serializer=response_type.SerializeToString)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    guard.unary(method.name, implementation),
                    request_deserializer=lenient_deserializer(request_type),
                    response_serializer=response_type.SerializeToString)
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _dispatch(self, name: str):
        # The servicer exists only once models are loaded; before that the guard refuses calls.
        def call(request, context, record):
            return getattr(self._servicer, name)(request, context, record)

        return call

    def load(self) -> None:
        """Load and warm up every model, then report SERVING."""
        started = time.perf_counter()
        self.store.warm_all(self.metrics, warmup=self.config.warmup)
        self._servicer = GapServicer(self.store, self.config.limits, self.metrics, self._max_response)
        self.lifecycle.state = "serving"
        self.health.serving()
        self.metrics.serving.set(1)
        log.info("serving", extra={"fields": {
            "port": self.port, "models": sorted(self.store.models), "seconds": round(time.perf_counter() - started, 3),
            "max_response_bytes": self._max_response,
        }})

    def drain(self, grace: float | None = None) -> bool:
        """Stop accepting, let in-flight calls finish within the grace period, stop. True if all finished."""
        grace = self.config.grace_seconds if grace is None else grace
        started = time.monotonic()
        self.lifecycle.state = "draining"
        self.health.draining()
        if self._gateway is not None:
            self._gateway.begin_drain()
        self.metrics.serving.set(0)
        log.info("draining", extra={"fields": {"grace_seconds": grace}})
        finished = self.lifecycle.wait_idle(grace)
        remaining = max(0.0, grace - (time.monotonic() - started))
        if self._server is not None:
            self._server.stop(remaining).wait()
        if self._gateway is not None:  # the answers of the calls that finished are still being written
            finished = self._gateway.stop(max(remaining, 1.0)) and finished
        if self._gateway_dir is not None:
            shutil.rmtree(self._gateway_dir, ignore_errors=True)
        if self._health_server is not None:  # probes saw NOT_SERVING until now
            self._health_server.stop(0).wait()
        self.metrics.stop()
        self._stopped.set()
        log.info("stopped", extra={"fields": {"clean": finished, "seconds": round(time.monotonic() - started, 3)}})
        return finished


# -- logging ------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in (getattr(record, "fields", {}) or {}).items())
        text = f"{record.levelname.lower():5s} {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("gap_service.server", "gap_service"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name == "gap_service.server" else logger.handlers
    server_logger = logging.getLogger("gap_service.server")
    server_logger.setLevel(level)
    server_logger.propagate = False


def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; 0 on a clean exit."""
    server = GapServer(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        loader = threading.Thread(target=_load_or_stop, args=(server, stop), name="gap-load", daemon=True)
        loader.start()
        while not stop.wait(0.5):
            pass
        if server.lifecycle.state == "starting" and getattr(server, "load_error", None) is not None:
            server.drain(0)
            return 1
        server.drain()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _load_or_stop(server: GapServer, stop: threading.Event) -> None:
    try:
        server.load()
    except Exception as exc:  # a model that cannot be served stops the server
        server.load_error = exc  # type: ignore[attr-defined]
        log.error("loading the models failed", exc_info=exc)
        stop.set()
