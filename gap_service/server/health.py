"""grpc.health.v1 status of the server: NOT_SERVING while starting and draining, SERVING between."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

from ..wire import pb

SERVICES = ("", pb.SERVICE_NAME)

Send = Callable[[health_pb2.HealthCheckResponse | None], None]


class _EndableHealthServicer(health.HealthServicer):
    """grpc's health servicer whose Watch streams can be ended.

    Every client of gap_service.client (gRPC client-side health checking) holds a Watch open on
    each replica; the server's stop waits for open calls, so one Watch kept SIGTERM waiting out the
    whole grace period. ``end_watches`` ends them (after their NOT_SERVING), and a Watch opened
    after it ends at once.
    """

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)
        self._watch_lock = threading.Lock()
        self._watches: set[Send] = set()
        self._ended = False

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Send | None = None):
        if send_response_callback is None:  # a server without non-blocking streams: nothing to end
            return super().Watch(request, context)
        send = _once(send_response_callback)
        super().Watch(request, context, send)  # sends the current status first
        with self._watch_lock:
            ended = self._ended
            if not ended:
                self._watches.add(send)
                context.add_callback(lambda: self._forget(send))
        if ended:
            send(None)
        return None

    def _forget(self, send: Send) -> None:
        with self._watch_lock:
            self._watches.discard(send)

    def end_watches(self) -> None:
        with self._watch_lock:
            self._ended = True
            watches, self._watches = list(self._watches), set()
        for send in watches:
            send(None)  # OK status: the stream ends, the client's health check sees NOT_SERVING


def _once(send: Send) -> Send:
    """``send`` that ends the stream at most once (the base servicer ends it again when the call closes)."""
    lock = threading.Lock()
    ended = False

    def forward(response: health_pb2.HealthCheckResponse | None) -> None:
        nonlocal ended
        with lock:
            if ended:
                return
            ended = response is None
            send(response)

    return forward


class Health:
    def __init__(self) -> None:
        self.servicer = _EndableHealthServicer()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, status: int) -> None:
        for name in SERVICES:
            self.servicer.set(name, status)

    def serving(self) -> None:
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def draining(self) -> None:
        """NOT_SERVING for good (later changes are ignored); open Watch streams are told, then ended."""
        self.servicer.enter_graceful_shutdown()
        self.servicer.end_watches()
