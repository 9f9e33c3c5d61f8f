"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

from ..errors import invalid


def parse_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """'1,3,224,224' or 'input=1,3,224,224' -> (name or None, shape)."""
    name, _, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d)
    except ValueError as exc:
        raise invalid("--input-shape", f"'{text}' is not a shape like 1,3,224,224") from exc
    if not shape:
        raise invalid("--input-shape", f"'{text}' is not a shape like 1,3,224,224")
    return (name or None), shape


def add_input_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="[NAME=]D0,D1,...",
        help="concrete input shape for models with dynamic dims (repeat per input)",
    )


def input_shapes(args: argparse.Namespace, input_names: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for text in args.input_shape:
        name, shape = parse_shape(text)
        shapes[name or input_names[0]] = shape
    return shapes
