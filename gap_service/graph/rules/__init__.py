"""The op table: op type -> entry (gradient rule, differentiable inputs, layout facts), one module
per op family, merged here. An op has one entry; a second one for the same op is refused.
See table.py for what an entry states and the one signature every rule has.
"""

from __future__ import annotations

from . import activation, conv, elementwise, linear, nondifferentiable, normalization, pool, reduce, resize, shape, softmax
from .table import Layout, OpEntry, Rule, input_grads, merge

OPS: dict[str, OpEntry] = merge(
    family.OPS
    for family in (activation, conv, elementwise, linear, nondifferentiable, normalization, pool, reduce, resize, shape, softmax)
)

UNKNOWN = OpEntry(None, (0,))  # an op not in the table: no facts, no rule


def entry(op: str) -> OpEntry:
    """The op's entry; ops the table does not know get ``UNKNOWN`` (unsupported on a path)."""
    return OPS.get(op, UNKNOWN)


def ops_with(facts: Layout) -> frozenset[str]:
    """The op types whose entry states any of ``facts``."""
    return frozenset(op for op, e in OPS.items() if e.layout & facts)


__all__ = ["OPS", "Layout", "OpEntry", "Rule", "entry", "input_grads", "merge", "ops_with"]
