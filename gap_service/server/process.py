"""Run ``gap-service serve`` in a subprocess and wait until it is SERVING (tests, benchmarks).

    with ServerProcess(["--model", "ppocr_cls"]) as server:
        client = GapClient(server.address)
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def json_lines(text: str) -> list[dict]:
    """The JSON log entries in a server's output (other lines, e.g. from libraries, skipped)."""
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
    return entries


class ServerProcess:
    """A server on 127.0.0.1 with a free gRPC and metrics port; logs go to ``log_path``."""

    def __init__(self, args: list[str] | tuple[str, ...] = (), startup_timeout: float = 120.0, env: dict | None = None,
                 client: dict | None = None) -> None:
        """``client``: GapClient arguments for the start-up health check (a TLS server's CA, ...)."""
        self.args = list(args)
        self.client = dict(client or {})
        self.startup_timeout = startup_timeout
        self.env = env
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="gap-server-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        command = [sys.executable, "-m", "gap_service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-host", "127.0.0.1", "--metrics-port", "0", *self.args]
        env = {**os.environ, **(self.env or {})}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            for entry in self.log_entries():
                if entry.get("event") == "listening":
                    self.port, self.metrics_port = entry["port"], entry.get("metrics_port")
                if entry.get("event") == "serving":
                    self._wait_health(deadline)
                    return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"server not SERVING after {self.startup_timeout} s:\n{self.log_text()}")

    def _wait_health(self, deadline: float) -> None:
        from ..client import GapClient

        with GapClient(self.address, **self.client) as client:
            client.wait_until_serving(max(1.0, deadline - time.monotonic()))

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict]:
        return json_lines(self.log_text())

    def requests(self, rpc: str | None = None) -> list[dict]:
        return [e for e in self.log_entries() if e.get("event") == "request" and (rpc is None or e.get("rpc") == rpc)]

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_SHARED: dict[tuple[str, ...], ServerProcess] = {}


def shared_server(args: list[str] | tuple[str, ...] = ()) -> ServerProcess:
    """One server per argument list for the whole process (stopped at exit)."""
    key = tuple(args)
    server = _SHARED.get(key)
    if server is None or server.process is None or server.process.poll() is not None:
        server = _SHARED[key] = ServerProcess(args).start()
    return server


@atexit.register
def _stop_shared() -> None:
    for server in _SHARED.values():
        server.stop(10)
