"""``gap-service serve``: serve a model repository over gRPC, and HTTP/JSON with --http-port (docs/service.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import GapError
from ..repository import BUNDLED_REPOSITORY
from ..state_cache import DEFAULT_STATE_CACHE_BYTES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC",
        description="Serve gAP explanations over gRPC (gap.v1.GapService, health, reflection) with Prometheus metrics.",
    )
    parser.add_argument("--model-repository", type=Path, default=BUNDLED_REPOSITORY, metavar="DIR",
                        help="model repository: DIR/<model>/config.json and DIR/<model>/<version>/model.onnx "
                             "(default: the bundled repository)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME", help="serve only these models (repeatable)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; [::] or 0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free port and logs it (default: 50051)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the Prometheus endpoint (plain HTTP, no authentication; default: 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="Prometheus /metrics port; 0 picks a free port, -1 turns it off (default: 9090)")
    parser.add_argument("--health-port", type=int, default=-1, metavar="N",
                        help="also serve grpc.health.v1 alone, in plaintext, on this port of --host (for probes that cannot "
                             "speak TLS, such as Kubernetes' gRPC probes); 0 picks a free port (default: off)")
    parser.add_argument("--http-port", type=int, default=-1, metavar="N",
                        help="also serve the API as HTTP/JSON (the google.api.http routes, /v1/...) and the explorer page "
                             "on this port of --host, TLS as the gRPC port; 0 picks a free port and logs it (default: off)")
    security = parser.add_argument_group("security (docs/security.md)")
    security.add_argument("--tls-cert", type=Path, metavar="PEM", help="TLS certificate chain of the server (with --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    security.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                          help="mTLS: require client certificates signed by this CA (needs --tls-cert)")
    security.add_argument("--api-keys", metavar="FILE|env:NAME",
                          help="require an API key (authorization: Bearer KEY) on every GapService call: a JSON list of "
                               "{name, key_sha256 or key, models} in FILE (read again when it changes) or in $NAME")
    security.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=True,
                          help="serve gRPC reflection, v1 and v1alpha (default: on; off in the container images)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-concurrent", type=int, default=0, metavar="N",
                        help="explanations computed at once (default: 4 on GPU, cores/4 on CPU, at least 1)")
    limits.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="explanations waiting for a slot; beyond that RESOURCE_EXHAUSTED (default: 64)")
    limits.add_argument("--max-batch-inputs", type=int, default=64, metavar="N",
                        help="inputs one Predict or Explain request may carry (its `inputs`; default: 64)")
    limits.add_argument("--max-tree-nodes", type=int, default=2000, metavar="N",
                        help="most nodes one explanation may produce, judged by its worst case (default: 2000)")
    limits.add_argument("--max-image-pixels", type=int, default=40_000_000, metavar="N",
                        help="largest decoded image in pixels (default: 40,000,000)")
    limits.add_argument("--max-request-bytes", type=int, default=64 * 2**20, metavar="N",
                        help="largest request message (default: 64 MiB)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                         help="onnxruntime execution provider (default: CUDA when available, else CPU)")
    runtime.add_argument("--threads", type=int, default=0, metavar="N",
                         help="intra-op threads per session (default: cores / max-concurrent)")
    parser.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long in-flight requests may take to finish (default: 30)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs at start")
    parser.add_argument("--state-cache-mb", type=float, default=DEFAULT_STATE_CACHE_BYTES / 2**20, metavar="MB",
                        help="memory for the forward state and nodes of recent inputs, so that Expand costs one level "
                             "run (default: %(default)g; 0: no cache)")
    parser.add_argument("--strict", action="store_true",
                        help="exit if any model fails to load (default: serve the others; ListModels says why)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format (default: json)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import CPU, CUDA, RuntimeConfig
    from ..server.app import ServeConfig, default_concurrency, serve, setup_logging
    from ..server.limits import ServerLimits
    from ..server.security import TlsFiles

    setup_logging(args.log_format, logging.INFO)
    providers = {"auto": None, "cpu": (CPU,), "cuda": (CUDA, CPU)}[args.provider]
    probe = RuntimeConfig(providers=providers)
    concurrent, threads = default_concurrency(probe)
    concurrent = args.max_concurrent or concurrent
    if args.max_concurrent and not args.threads:
        threads = max(1, threads * default_concurrency(probe)[0] // concurrent)
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and not args.tls_cert):
        raise GapError("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
    config = ServeConfig(
        repository=args.model_repository, host=args.host, port=args.port, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port, health_port=args.health_port, http_port=args.http_port,
        models=tuple(args.model),
        tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        api_keys=args.api_keys, reflection=args.reflection,
        limits=ServerLimits(
            max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels,
            max_tree_nodes=args.max_tree_nodes, max_concurrent=concurrent, max_queue=args.max_queue,
            max_batch_inputs=args.max_batch_inputs,
        ),
        runtime=RuntimeConfig(providers=providers, threads=args.threads or threads),
        grace_seconds=args.grace_period, warmup=not args.no_warmup, strict=args.strict,
        state_cache_bytes=int(args.state_cache_mb * 2**20),
    )
    return serve(config)
