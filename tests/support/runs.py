"""Counting the compiled model's runs: the real ones still run, each call is counted."""

from __future__ import annotations

from collections import Counter

import pytest


def count_runs(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Calls of ``CompiledModel.forward_many`` and ``run_levels`` from here on, by method."""
    from gap_service.compiled import CompiledModel

    counted: Counter = Counter()
    for method in ("forward_many", "run_levels"):
        real = getattr(CompiledModel, method)

        def counting(self, *args, _real=real, _method=method, **kwargs):
            counted[_method] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(CompiledModel, method, counting)
    return counted
