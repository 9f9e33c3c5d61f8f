"""Prometheus metrics of the server, on their own registry and HTTP port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..errors import printable
from .errors import CallRecord

log = logging.getLogger("gap_service.server")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gap_requests", "Finished RPCs by method and status code.", ["rpc", "code"], registry=r)
        self.latency = Histogram("gap_request_duration_seconds", "RPC latency, server side.", ["rpc"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.engine = Histogram("gap_engine_duration_seconds", "Time in the engine (model runs) per RPC.", ["rpc", "model"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.nodes = Counter("gap_nodes_computed", "Explanation tree nodes computed.", ["model"], registry=r)
        self.batch_size = Histogram("gap_batch_size", "Explanations computed together (dynamic batching).", ["model"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("gap_queue_depth", "Requests waiting for a computation slot.", ["pool"], registry=r)
        self.running = Gauge("gap_running", "Computations running.", ["pool"], registry=r)
        self.in_flight = Gauge("gap_in_flight_requests", "GapService RPCs in progress.", registry=r)
        self.model_load = Gauge("gap_model_load_seconds", "Seconds to load, compile and warm up a model.", ["model"], registry=r)
        self.model_info = Gauge("gap_model_info", "Served models (value 1) with their execution provider.",
                                ["model", "version", "provider"], registry=r)
        self.model_ready = Gauge("gap_model_ready", "1 for a served model, 0 for one that failed to load "
                                 "(ListModels says why).", ["model"], registry=r)
        self.serving = Gauge("gap_serving", "1 while the server reports SERVING.", registry=r)
        self._http = None

    def finished(self, record: CallRecord, seconds: float) -> None:
        """Observer of RpcGuard: count, time and log every call."""
        self.requests.labels(record.rpc, record.code).inc()
        self.latency.labels(record.rpc).observe(seconds)
        log.info("request", extra={"fields": {
            "rpc": record.rpc, "model": printable(record.model), "code": record.code, "nodes": record.nodes,
            "duration_ms": round(seconds * 1000, 3),
        }})

    def pool_changed(self, pool: str):
        def update(running: int, waiting: int) -> None:
            self.running.labels(pool).set(running)
            self.queue_depth.labels(pool).set(waiting)

        return update

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
