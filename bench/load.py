"""Load test of gap-service over gRPC: throughput and p50/p99 latency, and the gRPC overhead.

    .venv/bin/python bench/load.py                       # starts a server on the bundled repository
    .venv/bin/python bench/load.py --server HOST:PORT    # an already running server
    .venv/bin/python bench/load.py --model ppocr_cls --concurrency 1 4 16 --requests 64 --json out.json

For Predict and Explain (depth 3, top_k 5 by default) at each concurrency: throughput (requests/s)
and p50/p99 end-to-end latency. Then the gRPC overhead: end-to-end latency at concurrency 1 over
the in-process engine's time for the same request (the same tensor and options through
``Explainer.explain`` in this process), as p50 / p50; the goal is <= 1.1 for Explain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gap_service.client import GapClient
from gap_service.repository import BUNDLED_REPOSITORY, DEFAULT_MODEL, load_repository


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_load(call, concurrency: int, requests: int) -> dict:
    """``requests`` calls spread over ``concurrency`` threads, each thread with its own latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            started = time.perf_counter()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(type(exc).__name__ + ": " + str(getattr(exc, "code", lambda: "")()))
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency, "requests": requests, "ok": len(latencies), "errors": len(errors),
        "throughput_rps": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
    }


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="HOST:PORT of a running server (default: start one on 127.0.0.1)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled model to load (default {DEFAULT_MODEL})")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per (RPC, concurrency) (default 48)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--overhead-repeats", type=int, default=30, help="runs for the overhead ratio (default 30)")
    parser.add_argument("--server-args", default="", help="extra arguments for the started server, e.g. '--max-concurrent 2'")
    parser.add_argument("--json", dest="json_out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    entry = load_repository(BUNDLED_REPOSITORY)[args.model]
    tensor = np.random.RandomState(0).randn(*entry.config.input_shape).astype(np.float32)
    options = dict(depth=args.depth, top_k=args.top_k)

    server = None
    if args.server is None:
        from gap_service.server.process import ServerProcess

        server = ServerProcess(["--model", args.model, *args.server_args.split()]).start()
        address = server.address
    else:
        address = args.server
    results: dict = {"model": args.model, "options": options, "cpus": os.cpu_count(), "server": address, "load": []}
    try:
        client = GapClient(address, timeout=600)
        info = client.get_model(args.model)
        results["providers"] = list(info.model.providers)
        results["max_concurrent_explanations"] = info.limits.max_concurrent_explanations
        request = client.explain_request(args.model, tensor=tensor, **options)

        # In-process engine time for the same request (the server is idle meanwhile).
        explainer = entry.explainer()
        explainer.explain(tensor, **options)  # warm-up
        engine = timed(lambda: explainer.explain(tensor, **options), args.overhead_repeats)
        compiled = explainer.compiled()
        feeds = explainer.feeds(tensor)
        names = [compiled.decision.logits] + ([compiled.decision.probabilities] if compiled.decision.probabilities else [])
        forward = timed(lambda: compiled.forward(feeds, names), args.overhead_repeats)

        calls = {
            "Predict": lambda: client.stub.Predict(
                __import__("gap_service.wire.pb", fromlist=["service"]).service.PredictRequest(
                    model=args.model, input=request.input), timeout=600),
            "Explain": lambda: client.stub.Explain(request, timeout=600),
        }
        for name, call in calls.items():
            for _ in range(3):
                call()  # warm-up
            end_to_end = timed(call, args.overhead_repeats)
            local = engine if name == "Explain" else forward
            results[f"{name}_overhead"] = {
                "grpc_p50_ms": percentile(end_to_end, 50) * 1000, "in_process_p50_ms": percentile(local, 50) * 1000,
                "ratio_p50": percentile(end_to_end, 50) / percentile(local, 50),
                "ratio_mean": statistics.fmean(end_to_end) / statistics.fmean(local),
            }
            for concurrency in args.concurrency:
                row = run_load(call, concurrency, args.requests)
                row["rpc"] = name
                results["load"].append(row)
                print(f"{name:8s} c={concurrency:<3d} {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:8.1f} ms  "
                      f"p99 {row['p99_ms']:8.1f} ms  errors {row['errors']}", file=sys.stderr, flush=True)
        client.close()
    finally:
        if server is not None:
            server.stop()

    print(f"\nmodel {args.model} ({', '.join(results['providers'])}, {results['cpus']} CPUs, "
          f"{results['max_concurrent_explanations']} explanation(s) at once), Explain depth {args.depth} top_k {args.top_k}\n")
    print("| RPC | concurrency | throughput (req/s) | p50 (ms) | p99 (ms) | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in results["load"]:
        print(f"| {row['rpc']} | {row['concurrency']} | {row['throughput_rps']:.1f} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['errors']} |")
    print("\n| RPC | gRPC p50 (ms) | in-process p50 (ms) | overhead ratio (p50) | ratio (mean) |")
    print("|---|---:|---:|---:|---:|")
    for name in ("Predict", "Explain"):
        o = results[f"{name}_overhead"]
        print(f"| {name} | {o['grpc_p50_ms']:.2f} | {o['in_process_p50_ms']:.2f} | {o['ratio_p50']:.3f} | {o['ratio_mean']:.3f} |")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
