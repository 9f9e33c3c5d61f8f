"""The gRPC server of gap-service (``gap-service serve``): a thin adapter around ``Explainer``.

app.py       lifecycle: bind, load and warm up, serve, drain on SIGTERM
store.py     the served models: loaded, compiled at their served shapes, warmed up
servicer.py  the GapService RPCs: proto -> typed request -> one Explainer call -> proto
errors.py    the one mapping from exceptions to gRPC status codes, and the per-call guard
security.py  TLS/mTLS credentials (reloaded when their files change) and the API-key interceptor
reflection.py  server reflection, v1 and v1alpha
limits.py    admission: bounded concurrency and a bounded queue
metrics.py   Prometheus metrics; health.py: grpc.health.v1 status
Messages and their conversions live in gap_service.wire (the clients use them too).
"""
