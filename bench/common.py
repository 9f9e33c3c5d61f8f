"""Shared benchmark helpers: thread pinning, timing, and the ResNet-shaped torch networks that
the tests also use (tests/support/models.py), exported to ONNX."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def pin_threads(threads: int) -> None:
    """Same thread budget for torch and onnxruntime (set before either creates its pools)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_modules(module) -> list[tuple[str, object]]:
    """(name, module) of a tests/support ResNet's stages, highest first."""
    return [(f"stages.{i}", stage) for i, stage in reversed(list(enumerate(module.stages)))]
