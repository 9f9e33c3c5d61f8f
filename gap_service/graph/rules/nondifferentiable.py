"""Ops whose outputs carry no gradient: integer results, shapes, comparisons, rounding
(``derivatives.yaml``'s ``not_differentiable``). Gradient paths stop at them."""

from __future__ import annotations

from .table import not_differentiable

OPS = {
    op: not_differentiable()
    for op in ("Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
               "Not", "And", "Or", "Floor", "Ceil", "Round", "Sign", "NonZero", "ConstantOfShape", "Range", "TopK")
}
