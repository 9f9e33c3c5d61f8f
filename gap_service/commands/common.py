"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..atlas import Atlas, ChannelEntry
from ..errors import invalid
from ..methods import SCORE_MODES
from ..options import ExplainOptions

DEFAULTS = ExplainOptions()

# A channel's atlas entry by (layer, channel), None where the atlas has none: the local atlas or the server's.
ChannelLookup = Callable[[str, int], ChannelEntry | None]


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


def add_explain_options(parser: argparse.ArgumentParser) -> None:
    """The tree options and report outputs, shared by the local and the remote ``explain``."""
    parser.add_argument("--layers", help="comma-separated layer tensors, highest first (default: the model's)")
    parser.add_argument("--target", type=int, help="class index to explain (default: the top-1 class)")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help=f"children per node (default {DEFAULTS.top_k})")
    parser.add_argument("--depth", type=int, default=DEFAULTS.depth, help=f"tree depth in layers (default {DEFAULTS.depth})")
    parser.add_argument("--min-share", type=float, default=DEFAULTS.min_share, help="drop children below this share of their parent")
    parser.add_argument("--score", choices=SCORE_MODES, default=DEFAULTS.score, help=f"channel ranking (default {DEFAULTS.score})")
    parser.add_argument("--json", dest="json_out", help="write the tree as JSON here")
    parser.add_argument("--html", dest="html_out", help="write a self-contained HTML report here")
    parser.add_argument("--png", dest="png_out", help="write a PNG figure of the top levels here")


def parse_layers(text: str | None) -> list[str] | None:
    return [name for name in text.split(",") if name] or None if text else None


def explain_options(args: argparse.Namespace) -> ExplainOptions:
    """The ExplainOptions that ``add_explain_options``' flags ask for."""
    layers = parse_layers(args.layers)
    return ExplainOptions(layers=tuple(layers) if layers else None, target=args.target, top_k=args.top_k,
                          depth=args.depth, min_share=args.min_share, score=args.score)


def print_summary(explanation, elapsed: float, source: str = "", channels: ChannelLookup | None = None) -> None:
    """The decision and its first-level evidence, one line each; with the atlas's ``channels``, where
    each level-1 channel's top patches are, so a reader can see what the channel responds to."""
    label = f" '{explanation.label}'" if explanation.label is not None else ""
    probability = f", p={explanation.probability:.3f}" if explanation.probability is not None else ""
    where = f" from {source}" if source else ""
    print(f"class {explanation.target}{label}: logit {explanation.logit:.4f}{probability}; "
          f"{len(explanation.nodes)} nodes in {elapsed:.2f} s{where}")
    for node in explanation.level(1):
        print(f"  {node.layer} channel {node.channel}: score {node.score:.4g}, share {node.share:.1%}")
        entry = channels(node.layer, node.channel) if channels is not None else None
        if entry is not None:
            print(f"    top patches: {entry.sheet} row {entry.row} (mean activation {entry.stats.mean:.3g}, "
                  f"fires at {entry.stats.fire_rate:.1%} of positions)")


def write_outputs(explanation, args: argparse.Namespace, atlas: Atlas | None = None) -> None:
    """The JSON/HTML/PNG files that ``add_explain_options`` asked for (the HTML with ``atlas``'s patches)."""
    if not (args.html_out or args.png_out or args.json_out):
        return
    from ..report import write_report

    write_report(explanation, html_path=args.html_out, png_path=args.png_out, json_path=args.json_out, atlas=atlas)
    for out in (args.json_out, args.html_out, args.png_out):
        if out:
            print(f"wrote {out}")


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
