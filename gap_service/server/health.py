"""grpc.health.v1 status of the server: NOT_SERVING while starting and draining, SERVING between."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from ..wire import pb

SERVICES = ("", pb.SERVICE_NAME)


class Health:
    def __init__(self) -> None:
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, status: int) -> None:
        for name in SERVICES:
            self.servicer.set(name, status)

    def serving(self) -> None:
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def draining(self) -> None:
        """NOT_SERVING for good (later changes are ignored), and open Watch streams are told."""
        self.servicer.enter_graceful_shutdown()
