"""Container health check: exit 0 when the local gap-service answers grpc.health.v1 SERVING.

    python docker/healthcheck.py [--target HOST:PORT] [--service NAME] [--timeout SECONDS]

The Docker HEALTHCHECK of docker/Dockerfile and docker/Dockerfile.gpu runs it (Kubernetes uses its
native gRPC probes instead, see deploy/k8s/). The target defaults to GAP_HEALTH_TARGET, else
127.0.0.1:$GAP_HEALTH_PORT (the plaintext health-only port, 50052 in the images: the gRPC port may
speak TLS), else 127.0.0.1:$GAP_PORT (50051 by default). It prints the status
(SERVING, NOT_SERVING while the models load or the server drains, or the RPC error) and exits 0 only
for SERVING. Only grpcio and grpcio-health-checking are imported, so it starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys


def default_target() -> str:
    port = os.environ.get("GAP_HEALTH_PORT") or os.environ.get("GAP_PORT", "50051")
    return os.environ.get("GAP_HEALTH_TARGET") or f"127.0.0.1:{port}"


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=default_target(), help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server; or gap.v1.GapService)")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds (default: 3)")
    args = parser.parse_args(argv)
    status = check(args.target, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
