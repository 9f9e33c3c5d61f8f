"""Start-up and graceful shutdown: SERVING after warm-up, SIGTERM drains in-flight work and exits 0."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from gap_service.client import GapClient
from gap_service.server.process import ServerProcess

pytestmark = pytest.mark.timeout(180)

MODEL = "ppocr_cls"


def tensor():
    return np.random.RandomState(0).randn(1, 3, 48, 192).astype(np.float32)


def test_sigterm_drains_in_flight_requests_and_exits_0():
    server = ServerProcess(["--model", MODEL, "--max-concurrent", "1", "--grace-period", "30"]).start()
    try:
        entries = server.log_entries()
        listening = next(e for e in entries if e["event"] == "listening")
        assert listening["port"] == server.port and listening["port"] > 0 and listening["metrics_port"] > 0
        loaded = next(e for e in entries if e["event"] == "model loaded")
        assert loaded["providers"] and loaded["load_seconds"] > 0
        # No retries or replays: these tests watch what the draining server itself answers.
        client = GapClient(server.address, timeout=60, replays=0, options=[("grpc.enable_retries", 0)])
        results: list[object] = []

        def long_request():
            try:
                results.append(len(client.explain(MODEL, tensor=tensor(), depth=5, top_k=4, omit_maps=True).nodes))
            except grpc.RpcError as exc:
                results.append(exc.code())

        workers = [threading.Thread(target=long_request) for _ in range(2)]  # one runs, one waits in the queue
        for worker in workers:
            worker.start()
        _wait_for(lambda: "gap_in_flight_requests 2.0" in server.metrics_text())
        server.terminate()
        _wait_for(lambda: any(e["event"] == "draining" for e in server.log_entries()))
        with pytest.raises(grpc.RpcError) as error:
            client.predict(MODEL, tensor=tensor())
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.health() == "NOT_SERVING"
        for worker in workers:
            worker.join(60)
        assert len(results) == 2 and all(isinstance(r, int) and r > 1000 for r in results), results
        assert server.wait(30) == 0
        stopped = next(e for e in server.log_entries() if e["event"] == "stopped")
        assert stopped["clean"] is True
        client.close()
    finally:
        server.stop()


def test_grace_period_bounds_the_drain():
    server = ServerProcess(["--model", MODEL, "--max-concurrent", "1", "--grace-period", "0.3"]).start()
    try:
        # No retries or replays: these tests watch what the draining server itself answers.
        client = GapClient(server.address, timeout=60, replays=0, options=[("grpc.enable_retries", 0)])
        outcome: list[object] = []

        def very_long():
            try:
                for _ in range(20):
                    client.explain(MODEL, tensor=tensor(), depth=5, top_k=4, omit_maps=True)
                outcome.append("finished")
            except grpc.RpcError as exc:
                outcome.append(exc.code())

        worker = threading.Thread(target=very_long)
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        server.terminate()
        assert server.wait(30) == 0
        assert time.monotonic() - started < 10
        worker.join(30)
        assert outcome and outcome[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), outcome
        client.close()
    finally:
        server.stop()


def test_bad_repository_fails_to_start(tmp_path):
    with pytest.raises(RuntimeError, match="exited"):
        ServerProcess(["--model-repository", str(tmp_path)], startup_timeout=60).start()


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")
