"""The gradient rule table: op type -> rule, one module per op family.

A rule is a pure function ``rule(builder, node, output_grads) -> input_grads``: given the
gradients flowing into the node's outputs (None where nothing flows), it returns one
gradient per node input (None for inputs that are constant or not differentiable).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from ..builder import GradBuilder
from . import activation, conv, elementwise, linear, normalization, pool, reduce, resize, shape, softmax

Rule = Callable[[GradBuilder, gs.Node, list[gs.Tensor | None]], list[gs.Tensor | None]]

RULES: dict[str, Rule] = {}
for _family in (activation, conv, elementwise, linear, normalization, pool, reduce, resize, shape, softmax):
    _overlap = RULES.keys() & _family.RULES.keys()
    assert not _overlap, f"op types with two rules: {_overlap}"
    RULES.update(_family.RULES)

# Ops whose outputs carry no gradient (integer results, shapes, comparisons).
NON_DIFFERENTIABLE = frozenset(
    {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
     "Not", "And", "Or", "Floor", "Ceil", "Round", "Sign", "NonZero", "ConstantOfShape", "Range", "TopK"}
)

__all__ = ["RULES", "NON_DIFFERENTIABLE", "Rule"]
