"""bench/lb.py (the replica/nginx harness) loaded as a module, shared by the deployment tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent


def nginx_or_skip() -> str:
    """nginx, installed by scripts/ci-system-deps.sh when missing and root; else skip the test."""
    import os
    import subprocess

    import pytest

    lb = load_lb()
    binary = lb.nginx_binary()
    if binary is None and os.geteuid() == 0:
        subprocess.run(["bash", str(ROOT / "scripts" / "ci-system-deps.sh")], check=True, timeout=600)
        binary = lb.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed and this is not root: run `sudo bash scripts/ci-system-deps.sh`")
    return binary


def load_lb() -> ModuleType:
    """bench/lb.py: the harness the load-balancing tests and the benchmark share."""
    name = "gap_bench_lb"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "lb.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
