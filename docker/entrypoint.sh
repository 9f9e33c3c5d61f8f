#!/bin/sh
# Entry point of the gap-service images (docker/Dockerfile, docker/Dockerfile.gpu); the tests run this
# same script outside Docker (tests/test_deploy.py, tests/test_loadbalancing.py, bench/lb.py).
#
# It exec's `gap-service serve`, so the server is the container's main process and receives SIGTERM
# itself: it reports NOT_SERVING, refuses new calls with UNAVAILABLE, lets in-flight calls finish
# within GAP_GRACE_PERIOD seconds and exits 0 (see docs/service.md, docs/deploy.md).
#
# Configuration (environment; arguments given to the script are appended and win):
#   GAP_BIN               the gap-service executable          (default: gap-service on PATH)
#   GAP_MODEL_REPOSITORY  the model repository, a volume      (default: /models)
#   GAP_MODELS            models to serve, comma-separated    (default: every model of the repository)
#   GAP_HOST, GAP_PORT    gRPC address                        (default: [::] and 50051: all interfaces,
#                         where a local `gap-service serve` binds 127.0.0.1)
#   GAP_METRICS_HOST, GAP_METRICS_PORT  Prometheus /metrics   (default: 0.0.0.0 and 9090)
#   GAP_HEALTH_PORT       a plaintext grpc.health.v1-only port for HEALTHCHECK and Kubernetes' gRPC
#                         probes, which cannot speak TLS  (default: none; the images set 50052)
#   GAP_HTTP_PORT         the HTTP/JSON API and the explorer page, TLS as the gRPC port  (default: none;
#                         the images set 8000)
#   GAP_TLS_CERT, GAP_TLS_KEY  TLS on the gRPC port: PEM files (mounted secrets)  (default: none)
#   GAP_TLS_CLIENT_CA     mTLS: only clients with a certificate from this CA  (default: none)
#   GAP_API_KEYS          API keys, a JSON file or env:NAME (docs/security.md)  (default: none)
#   GAP_REFLECTION        on | off: gRPC reflection              (default: off)
#   GAP_GRACE_PERIOD      drain time on SIGTERM, in seconds   (default: 25; keep it below the
#                         orchestrator's stop timeout: compose stop_grace_period, Kubernetes
#                         terminationGracePeriodSeconds)
#   GAP_PROVIDER          auto | cpu | cuda                   (default: auto)
#   GAP_MAX_CONCURRENT, GAP_MAX_QUEUE, GAP_THREADS, GAP_MAX_TREE_NODES   limits (default: the server's)
#   GAP_LOG_FORMAT        json | text                         (default: json)
set -eu

case "${GAP_REFLECTION:-off}" in
    on) reflection=--reflection ;;
    off) reflection=--no-reflection ;;
    *) echo "entrypoint.sh: GAP_REFLECTION is on or off, not '$GAP_REFLECTION'" >&2; exit 2 ;;
esac

set -- \
    --model-repository "${GAP_MODEL_REPOSITORY:-/models}" \
    --host "${GAP_HOST:-[::]}" \
    --port "${GAP_PORT:-50051}" \
    --metrics-host "${GAP_METRICS_HOST:-0.0.0.0}" \
    --metrics-port "${GAP_METRICS_PORT:-9090}" \
    --grace-period "${GAP_GRACE_PERIOD:-25}" \
    --provider "${GAP_PROVIDER:-auto}" \
    --log-format "${GAP_LOG_FORMAT:-json}" \
    "$reflection" \
    ${GAP_HEALTH_PORT:+--health-port "$GAP_HEALTH_PORT"} \
    ${GAP_HTTP_PORT:+--http-port "$GAP_HTTP_PORT"} \
    ${GAP_TLS_CERT:+--tls-cert "$GAP_TLS_CERT"} \
    ${GAP_TLS_KEY:+--tls-key "$GAP_TLS_KEY"} \
    ${GAP_TLS_CLIENT_CA:+--tls-client-ca "$GAP_TLS_CLIENT_CA"} \
    ${GAP_API_KEYS:+--api-keys "$GAP_API_KEYS"} \
    ${GAP_MAX_CONCURRENT:+--max-concurrent "$GAP_MAX_CONCURRENT"} \
    ${GAP_MAX_QUEUE:+--max-queue "$GAP_MAX_QUEUE"} \
    ${GAP_THREADS:+--threads "$GAP_THREADS"} \
    ${GAP_MAX_TREE_NODES:+--max-tree-nodes "$GAP_MAX_TREE_NODES"} \
    "$@"

for model in $(printf '%s' "${GAP_MODELS:-}" | tr ',' ' '); do
    set -- "$@" --model "$model"
done

exec "${GAP_BIN:-gap-service}" serve "$@"
