"""Load-balanced gap-service replicas on loopback: a harness (tests) and a benchmark (docs/deploy.md).

    .venv/bin/python bench/lb.py                                   # 1 vs 3 replicas behind nginx
    .venv/bin/python bench/lb.py --replicas 1 3 --concurrency 4 --requests 300 --model ppocr_cls
    .venv/bin/python bench/lb.py --fault --requests 600             # the fault run: SIGTERM one, SIGKILL one

Every replica is started by the containers' own entry point (docker/entrypoint.sh) on its own
127.0.0.1 port, and nginx (grpc_pass over HTTP/2) runs with the containers' own load-balancer
configuration (docker/nginx/gap-grpc.conf, only its marked replicas block replaced), from a private
prefix in a temporary folder. The load is Explain (depth 3, top_k 5 by default) of one fixed tensor,
bounded in count and time; every answer is compared byte for byte with the answer of a replica
asked directly. Reported: requests/s, p50/p99 latency, and per replica the calls it served.

The harness (``Replica``, ``Nginx``, ``drive``, ``SERVICE_CONFIG``) is what tests/test_loadbalancing.py
uses, so the figures and the tests run the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
NGINX_CONF = ROOT / "docker" / "nginx" / "gap-grpc.conf"
MODELS = ROOT / "models"
LOOPBACK = "127.0.0.1"

# The client side of the retry story lives in the client library (gap_service/client.py).
from gap_service.server.process import json_lines  # noqa: E402
from gap_service.client import RETRY_POLICY, channel_options, retryable, service_config  # noqa: E402,F401


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(interval)


def gap_bin() -> str:
    """The gap-service executable of this interpreter's environment (the image puts it on PATH)."""
    candidate = Path(sys.executable).parent / "gap-service"
    return str(candidate) if candidate.exists() else (shutil.which("gap-service") or "gap-service")


# -- replicas ---------------------------------------------------------------------------------------
class Replica:
    """``docker/entrypoint.sh`` on 127.0.0.1, configured through the same environment as in a container."""

    def __init__(self, name: str, workdir: Path, models: Sequence[str] = ("ppocr_cls",), port: int = 0,
                 grace_period: float = 10.0, env: dict[str, str] | None = None,
                 repository: Path = MODELS) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.models = list(models)
        self.port = port
        self.metrics_port: int | None = None
        self.grace_period = grace_period
        self.extra_env = dict(env or {})
        self.repository = repository
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = self.workdir / f"{name}.log"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "GAP_BIN": gap_bin(), "GAP_MODEL_REPOSITORY": str(self.repository), "GAP_MODELS": ",".join(self.models),
            "GAP_HOST": LOOPBACK, "GAP_PORT": str(self.port), "GAP_METRICS_HOST": LOOPBACK, "GAP_METRICS_PORT": "0",
            "GAP_GRACE_PERIOD": str(self.grace_period), "GAP_PROVIDER": "cpu", **self.extra_env,
        }

    def start(self) -> Replica:
        """Start (non-blocking); ``wait_serving`` waits for SERVING. A restart keeps the port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen([str(ENTRYPOINT)], env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        return self

    def log_entries(self, all_runs: bool = False) -> list[dict]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as handle:
            if not all_runs:
                handle.seek(self._log_offset)
            return json_lines(handle.read().decode(errors="replace"))

    def requests(self, rpc: str = "Explain", all_runs: bool = True) -> Counter:
        """Calls this replica logged, by status code."""
        return Counter(e.get("code") for e in self.log_entries(all_runs) if e.get("event") == "request" and e.get("rpc") == rpc)

    def wait_serving(self, timeout: float = 120.0) -> Replica:
        assert self.process is not None

        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited with {self.process.returncode}:\n{self.log_text()}")
            entries = self.log_entries()
            for entry in entries:
                if entry.get("event") == "listening":
                    self.port, self.metrics_port = entry["port"], entry.get("metrics_port")
            return any(e.get("event") == "serving" for e in entries)

        wait_for(ready, timeout, f"replica {self.name} SERVING")
        wait_for(lambda: self.health() == "SERVING", 30, f"replica {self.name} health")
        return self

    def health(self) -> str:
        sys.path.insert(0, str(HEALTHCHECK.parent))
        try:
            import healthcheck
        finally:
            sys.path.pop(0)
        return healthcheck.check(self.address, timeout=2.0)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.alive():
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.process.wait(10)
        return self.process.returncode


# -- nginx ------------------------------------------------------------------------------------------
REPLICAS_BLOCK = re.compile(r"(?m)^([ \t]*)# BEGIN replicas.*?\n.*?^[ \t]*# END replicas[^\n]*\n", re.DOTALL)
LISTEN_LINE = re.compile(r"(?m)^([ \t]*)listen \d+ http2;")
ACCESS_LOG_LINE = re.compile(r"(?m)^([ \t]*)access_log /dev/stdout gap_grpc;")


def render_nginx_conf(upstreams: Sequence[str], port: int, access_log: Path, upstream_options: str = "max_fails=1 fail_timeout=2s",
                      source: Path = NGINX_CONF) -> str:
    """docker/nginx/gap-grpc.conf with its replicas block, listen address and access log replaced."""
    text = source.read_text()
    if not REPLICAS_BLOCK.search(text) or not LISTEN_LINE.search(text) or not ACCESS_LOG_LINE.search(text):
        raise ValueError(f"{source}: the replicas block, the listen line or the access_log line is missing")

    def replicas(match: re.Match) -> str:
        indent = match.group(1)
        lines = [f"{indent}# replicas on loopback (bench/lb.py)"]
        lines += [f"{indent}server {address} {upstream_options};" for address in upstreams]
        return "\n".join(lines) + "\n"

    text = REPLICAS_BLOCK.sub(replicas, text, count=1)
    text = LISTEN_LINE.sub(lambda m: f"{m.group(1)}listen {LOOPBACK}:{port} http2;", text, count=1)
    return ACCESS_LOG_LINE.sub(lambda m: f"{m.group(1)}access_log {access_log} gap_grpc;", text, count=1)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class Nginx:
    """nginx in the foreground from a private prefix (config, pid, logs, temp files) under ``workdir``."""

    def __init__(self, upstreams: Sequence[str], workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        self.upstreams = list(upstreams)
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.binary = binary or nginx_binary()
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (scripts/ci-system-deps.sh installs it)")
        self.process: subprocess.Popen | None = None
        self.conf_path = self.workdir / "nginx.conf"
        self.access_log = self.workdir / "access.log"
        self.error_log = self.workdir / "error.log"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def main_conf(self) -> str:
        w = self.workdir
        user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must reach the private prefix
        return (
            f"{user}daemon off;\nworker_processes 1;\npid {w}/nginx.pid;\nerror_log {self.error_log} info;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"    client_body_temp_path {w}/tmp/body;\n    proxy_temp_path {w}/tmp/proxy;\n"
            f"    fastcgi_temp_path {w}/tmp/fastcgi;\n    uwsgi_temp_path {w}/tmp/uwsgi;\n    scgi_temp_path {w}/tmp/scgi;\n"
            f"    include {w}/gap-grpc.conf;\n"
            "}\n"
        )

    def write_config(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.workdir / "gap-grpc.conf").write_text(render_nginx_conf(self.upstreams, self.port, self.access_log))
        self.conf_path.write_text(self.main_conf())

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(self.conf_path), "-e", str(self.error_log), *extra]

    def test_config(self) -> subprocess.CompletedProcess:
        self.write_config()
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30, check=False)

    def start(self, timeout: float = 20.0) -> Nginx:
        self.write_config()
        with open(self.workdir / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)

        def listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.errors()}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(listening, timeout, "nginx listening")
        return self

    def errors(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.workdir / "stderr.log", self.error_log) if p.exists()]
        return "\n".join(parts)

    def access_entries(self) -> list[dict[str, str]]:
        if not self.access_log.exists():
            return []
        entries = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            entry = dict(re.findall(r"(\w+)=(\S*)", line))
            match = re.search(r'"(\S+)" (\d{3})', line)
            if match:
                entry["uri"], entry["status"] = match.group(1), match.group(2)
            entries.append(entry)
        return entries

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open calls
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- load -------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    index: int
    ok: bool  # an answer byte-identical to the reference
    code: str  # OK, a status code name, or WRONG_ANSWER
    latency: float
    attempts: int = 1  # calls the caller made (the channel's retry policy may have made more per call)
    started: float = 0.0
    details: str = ""
    retried_after: list[str] = field(default_factory=list)  # the failures the caller replayed


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def answered(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def codes(self) -> Counter:
        return Counter(o.code for o in self.outcomes)

    def latencies(self) -> list[float]:
        return sorted(o.latency for o in self.outcomes if o.ok)

    def percentile(self, q: float) -> float:
        values = self.latencies()
        if not values:
            return float("nan")
        import numpy as np

        return float(np.percentile(np.asarray(values), q))

    def summary(self) -> dict:
        return {
            "sent": self.sent, "answered": self.answered, "lost": self.sent - self.answered,
            "replayed_by_caller": sum(o.attempts > 1 for o in self.outcomes),
            "caller_replay_causes": dict(Counter(f.split(" (")[0] for o in self.outcomes for f in o.retried_after)),
            "codes": dict(self.codes),
            "throughput_rps": self.answered / self.wall if self.wall else float("nan"),
            "p50_ms": self.percentile(50) * 1000, "p99_ms": self.percentile(99) * 1000, "wall_s": self.wall,
        }


def explain_request(model: str = "ppocr_cls", depth: int = 3, top_k: int = 5, seed: int = 0):
    import numpy as np

    from gap_service.client import explain_request as request
    from gap_service.repository import load_repository

    shape = load_repository(MODELS)[model].config.input_shape
    tensor = np.random.RandomState(seed).randn(*shape).astype(np.float32)
    return request(model, tensor=tensor, depth=depth, top_k=top_k)


def reference_answer(address: str, request, timeout: float = 60.0) -> bytes:
    """The explanation a replica gives when asked directly (serialised deterministically)."""
    import grpc

    from gap_service.wire import pb

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        response = pb.service_grpc.GapServiceStub(channel).Explain(request, timeout=timeout)
    return response.explanation.SerializeToString(deterministic=True)


def drive(target: str, request, reference: bytes, total: int, concurrency: int, *, options: Sequence[tuple[str, object]] = (),
          timeout: float = 30.0, budget: float = 120.0, on_progress: Callable[[int], None] | None = None,
          retries: int = 2, retry_backoff: float = 0.25, tag: str = "lb") -> LoadResult:
    """``total`` Explain calls from ``concurrency`` threads over one channel; stops early past ``budget`` s.

    Each call is sent with an ``x-request-id`` of ``tag-index`` (nginx logs it) and, when it fails in a ``retryable``
    way, replayed up to ``retries`` more times after ``retry_backoff`` (doubling): the caller's part
    of the retry story, on top of the channel's retry policy (``options``). ``on_progress(n)`` is
    called (from a worker) after the n-th finished call, for fault injection.
    """
    import grpc

    from gap_service.wire import pb

    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1), *options])
    stub = pb.service_grpc.GapServiceStub(channel)
    result = LoadResult()
    lock = threading.Lock()
    counter = iter(range(total))
    finished = [0]
    started = time.perf_counter()
    deadline = started + budget

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            began = time.perf_counter()
            attempts, failures = 0, []
            while True:
                attempts += 1
                try:
                    response = stub.Explain(request, timeout=timeout, metadata=(("x-request-id", f"{tag}-{index}"),))
                    good = response.explanation.SerializeToString(deterministic=True) == reference
                    code, details = ("OK" if good else "WRONG_ANSWER"), ""
                    break
                except grpc.RpcError as exc:
                    good, code, details = False, exc.code().name, exc.details() or ""
                    if attempts > retries or not retryable(exc):
                        break
                    failures.append(f"{code}: {details}")
                    time.sleep(retry_backoff * 2 ** (attempts - 1))
            outcome = Outcome(index, good, code, time.perf_counter() - began, attempts, began - started, details, failures)
            with lock:
                result.outcomes.append(outcome)
                finished[0] += 1
                done = finished[0]
            if on_progress is not None:
                on_progress(done)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    result.wall = time.perf_counter() - started
    channel.close()
    result.outcomes.sort(key=lambda o: o.index)
    return result


class Cluster:
    """N replicas (docker/entrypoint.sh) behind nginx (docker/nginx/gap-grpc.conf), all on 127.0.0.1."""

    def __init__(self, workdir: Path, replicas: int = 3, models: Sequence[str] = ("ppocr_cls",), grace_period: float = 10.0,
                 env: dict[str, str] | None = None, nginx: bool = True) -> None:
        self.workdir = Path(workdir)
        self.replicas = [Replica(f"replica{i}", self.workdir, models, grace_period=grace_period, env=env) for i in range(replicas)]
        self.use_nginx = nginx
        self.nginx: Nginx | None = None

    def start(self) -> Cluster:
        try:
            for replica in self.replicas:  # start together, wait together: start-up overlaps
                replica.start()
            for replica in self.replicas:
                replica.wait_serving()
            if self.use_nginx:
                self.nginx = Nginx([r.address for r in self.replicas], self.workdir / "nginx").start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for replica in self.replicas:
            replica.stop(15)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the benchmark ----------------------------------------------------------------------------------
def measure(replicas: int, model: str, concurrency: int, requests: int, workdir: Path, depth: int, top_k: int,
            threads: int | None, max_concurrent: int | None = None) -> dict:
    env = {**({"GAP_THREADS": str(threads)} if threads else {}), **({"GAP_MAX_CONCURRENT": str(max_concurrent)} if max_concurrent else {})}
    with Cluster(Path(tempfile.mkdtemp(prefix=f"r{replicas}-c{concurrency}-", dir=workdir)), replicas, (model,), env=env) as cluster:
        request = explain_request(model, depth, top_k)
        reference = reference_answer(cluster.replicas[0].address, request)
        drive(cluster.nginx.address, request, reference, max(4, concurrency * 2), concurrency,
              options=channel_options())  # warm-up: connections, first runs
        before = {r.name: sum(r.requests().values()) for r in cluster.replicas}
        result = drive(cluster.nginx.address, request, reference, requests, concurrency, options=channel_options(), budget=600)
        row = {"replicas": replicas, "concurrency": concurrency, **result.summary(),
               "served": {r.name: sum(r.requests().values()) - before[r.name] for r in cluster.replicas},
               "threads_per_replica": next((e.get("threads") for e in cluster.replicas[0].log_entries() if e.get("event") == "listening"), None),
               "max_concurrent_per_replica": next((e.get("max_concurrent") for e in cluster.replicas[0].log_entries()
                                                   if e.get("event") == "listening"), None)}
    return row


def fault_run(model: str, concurrency: int, requests: int, workdir: Path, depth: int, top_k: int,
              env: dict[str, str] | None = None) -> dict:
    """The fault scenario of tests/test_loadbalancing.py at bench scale."""
    with Cluster(workdir / "fault", 3, (model,), grace_period=10, env=env) as cluster:
        request = explain_request(model, depth, top_k)
        reference = reference_answer(cluster.replicas[0].address, request)
        events = fault_schedule(cluster, requests)
        result = drive(cluster.nginx.address, request, reference, requests, concurrency, options=channel_options(),
                       budget=600, on_progress=events)
        events.join()
        return {**result.summary(), **events.report(cluster)}


def nginx_report(entries: list[dict[str, str]]) -> dict:
    """What nginx's access log says about the calls: how many reached it, how many nginx moved to
    another replica itself (refused connection), how many requests the channel's retry policy sent
    again (grpc-previous-rpc-attempts), and the answers that were not OK."""
    by_request: dict[str, list[dict[str, str]]] = {}
    for entry in entries:
        by_request.setdefault(entry.get("rid", "-"), []).append(entry)
    return {
        "nginx_calls": len(entries),
        "nginx_failed_over": sum("," in e.get("upstream", "") for e in entries),
        "policy_retried_requests": sum(any(e.get("attempt", "-") not in ("-", "") for e in group) for group in by_request.values()),
        "policy_retry_attempts": sum(e.get("attempt", "-") not in ("-", "") for e in entries),
        "nginx_non_ok": dict(Counter(f"{e.get('status')}/{e.get('grpc_status')}/{e.get('upstream_status')}" for e in entries
                                     if (e.get("status"), e.get("grpc_status")) != ("200", "0"))),
    }


class fault_schedule:
    """Callable for ``drive(on_progress=...)``: SIGTERM replica 1 at 25 % of the load, SIGKILL replica 2
    at 45 %, restart replica 2 (same port) at 65 %; the events run in a thread, not in the load's workers."""

    def __init__(self, cluster: Cluster, total: int) -> None:
        self.cluster = cluster
        self.marks = {max(1, total * 25 // 100): "terminate", max(2, total * 45 // 100): "kill", max(3, total * 65 // 100): "restart"}
        self.log: list[tuple[float, str]] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.t0 = time.perf_counter()
        self.rejoined_at: float | None = None

    def __call__(self, done: int) -> None:
        action = self.marks.pop(done, None)
        if action is not None:
            thread = threading.Thread(target=self._run, args=(action,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, action: str) -> None:
        try:
            drained, killed = self.cluster.replicas[1], self.cluster.replicas[2]
            self.log.append((time.perf_counter() - self.t0, action))
            if action == "terminate":
                drained.terminate()
            elif action == "kill":
                killed.kill()
                killed.wait(10)
            elif action == "restart":
                killed.wait(10)
                killed.start().wait_serving(60)  # same port: nginx's upstream list is static
                self.rejoined_at = time.perf_counter() - self.t0
                self.log.append((self.rejoined_at, "rejoined"))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.errors.append(exc)

    def join(self, timeout: float = 90.0) -> None:
        for thread in self.threads:
            thread.join(timeout)
        if self.errors:
            raise self.errors[0]

    def report(self, cluster: Cluster, tag: str = "lb") -> dict:
        nginx_entries = [e for e in cluster.nginx.access_entries()
                         if e.get("uri", "").endswith("/Explain") and e.get("rid", "").startswith(f"{tag}-")]
        return {
            "events": [(round(t, 2), a) for t, a in self.log],
            "drained_exit_code": cluster.replicas[1].process.poll(),
            "killed_rejoined": self.rejoined_at is not None,
            "served_by_replica": {r.name: dict(r.requests()) for r in cluster.replicas},
            "served_by_restarted_replica": dict(cluster.replicas[2].requests(all_runs=False)) if self.rejoined_at else {},
            **nginx_report(nginx_entries),
        }


def chaos_run(model: str, concurrency: int, requests: int, workdir: Path, depth: int, top_k: int, period: float,
              env: dict[str, str] | None = None) -> dict:
    """SIGKILL replica 1 or 2 (alternately) every ``period`` seconds during the load, restarting each
    at once: many deaths, some while an answer is flowing (the case only the caller can replay)."""
    with Cluster(workdir / "chaos", 3, (model,), grace_period=10, env=env) as cluster:
        request = explain_request(model, depth, top_k)
        reference = reference_answer(cluster.replicas[0].address, request)
        stop = threading.Event()
        kills = [0]

        def chaos() -> None:
            while not stop.wait(period):
                victim = cluster.replicas[1 + kills[0] % 2]
                victim.kill()
                victim.wait(10)
                kills[0] += 1
                victim.start().wait_serving(60)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        try:
            result = drive(cluster.nginx.address, request, reference, requests, concurrency, options=channel_options(),
                           budget=600, tag="chaos")
        finally:
            stop.set()
            thread.join(90)
        entries = [e for e in cluster.nginx.access_entries() if e.get("rid", "").startswith("chaos-")]
        return {**result.summary(), "kills": kills[0], **nginx_report(entries)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocr_cls")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=300, help="calls per (replicas, concurrency) (default 300)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per replica (GAP_THREADS; default: the server's choice)")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="explanations at once per replica (GAP_MAX_CONCURRENT; default: the server's choice)")
    parser.add_argument("--fault", action="store_true", help="run the fault scenario instead (3 replicas)")
    parser.add_argument("--chaos", type=float, default=0.0, metavar="SECONDS",
                        help="instead: kill and restart a replica every SECONDS during the load (3 replicas)")
    parser.add_argument("--json", dest="json_out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if nginx_binary() is None:
        parser.error("nginx is not installed: bash scripts/ci-system-deps.sh")

    workdir = Path(tempfile.mkdtemp(prefix="gap-lb-"))
    results: dict = {"model": args.model, "depth": args.depth, "top_k": args.top_k, "cpus": os.cpu_count(), "rows": []}
    try:
        env = {**({"GAP_THREADS": str(args.threads)} if args.threads else {}),
               **({"GAP_MAX_CONCURRENT": str(args.max_concurrent)} if args.max_concurrent else {})}
        if args.fault or args.chaos:
            concurrency = args.concurrency[-1]
            if args.fault:
                key, run = "fault", fault_run(args.model, concurrency, args.requests, workdir, args.depth, args.top_k, env)
            else:
                key, run = "chaos", chaos_run(args.model, concurrency, args.requests, workdir, args.depth, args.top_k, args.chaos, env)
            results[key] = {**run, "concurrency": concurrency}
            print(json.dumps(results[key], indent=2, default=str))
        else:
            for replicas in args.replicas:
                for concurrency in args.concurrency:
                    row = measure(replicas, args.model, concurrency, args.requests, workdir, args.depth, args.top_k,
                                  args.threads or None, args.max_concurrent or None)
                    results["rows"].append(row)
                    print(f"replicas={replicas} c={concurrency:<3d} {row['throughput_rps']:7.1f} req/s  "
                          f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  lost {row['lost']}  served {row['served']}",
                          file=sys.stderr, flush=True)
            print(f"\n{args.model} Explain depth {args.depth} top_k {args.top_k} through nginx, {results['cpus']} CPUs\n")
            print("| replicas | threads x slots per replica | concurrency | requests | req/s | p50 (ms) | p99 (ms) | lost | served per replica |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for row in results["rows"]:
                print(f"| {row['replicas']} | {row['threads_per_replica']} x {row['max_concurrent_per_replica']} | {row['concurrency']} | "
                      f"{row['sent']} | {row['throughput_rps']:.1f} | "
                      f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['lost']} | {' / '.join(map(str, row['served'].values()))} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
