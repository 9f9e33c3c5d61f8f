"""The gRPC server of gap-service (``gap-service serve``): a thin adapter around the engine.

app.py       lifecycle: bind, load and warm up, serve, drain on SIGTERM
servicer.py  the GapService RPCs: proto -> typed request -> engine call -> proto
convert.py   proto <-> numpy / Explanation
errors.py    the one mapping from exceptions to gRPC status codes, and the per-call guard
limits.py    admission: bounded concurrency and a bounded queue
metrics.py   Prometheus metrics; health.py: grpc.health.v1 status
protogen.py  the build step generating gap_service/_proto from protos/ (pb.py imports it)
"""
