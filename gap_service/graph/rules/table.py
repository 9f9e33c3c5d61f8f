"""What one table entry says about an op: its gradient rule, which inputs the rule differentiates,
and the layout facts that layer discovery reads (in the spirit of JAX's ``defjvp_zero`` /
``deflinear`` and PyTorch's ``derivatives.yaml`` with its ``not_differentiable``).

A rule is a pure function ``rule(builder, node, output_grads) -> grads``: given the gradients
flowing into the node's outputs (None where nothing flows), it returns one gradient (or None)
per input the entry declares differentiable, in that order. ``input_grads`` places them at the
node's inputs; every other input (shapes, axes, weights) gets None there, in this one place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ..builder import GradBuilder, Tensor

Rule = Callable[[GradBuilder, gs.Node, list[Tensor | None]], Sequence[Tensor | None]]
# Rewrites the gradient graph's own copy of a forward node before any rule runs (e.g. MaxPool
# also returns its argmax indices); the model's graph is never touched.
Prepare = Callable[[gs.Node], None]


class Layout(enum.Flag):
    """Layout facts of an op (layers.py derives channel axes and layer candidates from them)."""

    NONE = 0
    NCHW = enum.auto()  # reads and writes NCHW: axis 1 of its 4-D input and output holds the channels
    ELEMENTWISE = enum.auto()  # per element, broadcasting: all its 4-D operands share one layout
    COPY = enum.auto()  # only moves or copies values (reshape, transpose, pad, slice...): never a layer
    POOLING = enum.auto()  # pools each channel on its own: a copy of the map below, never a layer
    SAME_ORDER = enum.auto()  # the input's values in the same order: after a Softmax, still probabilities


@dataclass(frozen=True)
class OpEntry:
    """One op's row in the table. ``differentiable`` lists the inputs ``rule`` returns gradients
    for (None: every input, for variadic ops); ``()`` means the outputs carry no gradient at all.
    An entry with inputs to differentiate but no rule is a known op whose rule is missing."""

    rule: Rule | None
    differentiable: tuple[int, ...] | None = (0,)
    layout: Layout = Layout.NONE
    prepare: Prepare | None = None

    @property
    def carries_gradient(self) -> bool:
        return self.differentiable != ()

    @property
    def has_rule(self) -> bool:
        """False where a gradient path through the op cannot be built."""
        return self.rule is not None or not self.carries_gradient


def unary(rule: Rule, layout: Layout = Layout.NONE, prepare: Prepare | None = None) -> OpEntry:
    """Differentiable in its first input only (the others are shapes, axes, weights or bounds)."""
    return OpEntry(rule, (0,), layout, prepare)


def variadic(rule: Rule, layout: Layout = Layout.NONE) -> OpEntry:
    """Differentiable in every input (broadcasting arithmetic, Concat, MatMul)."""
    return OpEntry(rule, None, layout)


def inputs(indices: tuple[int, ...], rule: Rule, layout: Layout = Layout.NONE) -> OpEntry:
    """Differentiable in the listed inputs (absent optional inputs get None from the rule)."""
    return OpEntry(rule, indices, layout)


def not_differentiable(layout: Layout = Layout.NONE) -> OpEntry:
    """Outputs that carry no gradient: integer results, shapes, comparisons, rounding."""
    return OpEntry(None, (), layout)


def no_rule(layout: Layout) -> OpEntry:
    """A known op (its layout facts hold) without a gradient rule yet: unsupported on a path."""
    return OpEntry(None, (0,), layout)


def input_grads(entry: OpEntry, b: GradBuilder, node: gs.Node, output_grads: list[Tensor | None]) -> list[Tensor | None]:
    """The rule's gradients placed at the node's inputs, None at the inputs it does not differentiate."""
    assert entry.rule is not None, f"{node.op} has no gradient rule"
    grads = entry.rule(b, node, output_grads)
    indices = range(len(node.inputs)) if entry.differentiable is None else entry.differentiable
    placed: list[Tensor | None] = [None] * len(node.inputs)
    for index, grad in zip(indices, grads, strict=True):
        if grad is not None:
            placed[index] = grad
    return placed


def merge(families: Iterable[Mapping[str, OpEntry]]) -> dict[str, OpEntry]:
    """One table from the families' tables; an op type with two entries is refused."""
    table: dict[str, OpEntry] = {}
    for family in families:
        overlap = table.keys() & family.keys()
        if overlap:
            raise ValueError(f"op types with two entries: {sorted(overlap)}")
        table.update(family)
    return table
