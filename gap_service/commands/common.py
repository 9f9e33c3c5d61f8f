"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..atlas import Atlas, ChannelEntry
from ..errors import invalid
from ..methods import SCORE_MODES
from ..options import DetectionTarget, ElementTarget, ExplainOptions, RegionTarget, Target
from ..prediction import DetectedBox

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
    parser.add_argument("--layers", help="comma-separated layer tensors, highest first (default: found for the target)")
    add_target_options(parser)
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help=f"children per node (default {DEFAULTS.top_k})")
    parser.add_argument("--depth", type=int, default=DEFAULTS.depth, help=f"tree depth in layers (default {DEFAULTS.depth})")
    parser.add_argument("--min-share", type=float, default=DEFAULTS.min_share, help="drop children below this share of their parent")
    parser.add_argument("--score", choices=SCORE_MODES, default=DEFAULTS.score, help=f"channel ranking (default {DEFAULTS.score})")
    parser.add_argument("--json", dest="json_out", help="write the tree as JSON here")
    parser.add_argument("--html", dest="html_out", help="write a self-contained HTML report here")
    parser.add_argument("--png", dest="png_out", help="write a PNG figure of the top levels here")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """What is explained: one kind of target, or a seed (docs/targets.md)."""
    group = parser.add_argument_group("what to explain (default: the model's task: a classifier's top-1 class, a "
                                      "detector's best box, a dense map's whole channel; docs/targets.md)")
    kinds = group.add_mutually_exclusive_group()
    kinds.add_argument("--target", type=int, metavar="CLASS", help="a class of a class-vector output: its logit")
    kinds.add_argument("--target-detection", type=int, metavar="I",
                       help="detection I of the decoded boxes, best first (see gap-service detections)")
    kinds.add_argument("--target-region", type=int, metavar="CHANNEL",
                       help="a channel of a dense output [1, C, H, W], summed over --region-box or --region-mask "
                            "(default: the whole map)")
    kinds.add_argument("--target-element", metavar="'OUTPUT[i,j,...]'", help="one element of an output, by its full index")
    kinds.add_argument("--seed", metavar="FILE.npy", help="a custom decision <seed, output>: a seed shaped like the output")
    group.add_argument("--target-class", type=int, metavar="CLASS", help="with --target-detection: the box's score for CLASS")
    group.add_argument("--spread", action="store_true",
                       help="with --target-detection: add the anchors NMS merged into the box, weighted by their IoU")
    group.add_argument("--region-box", metavar="X1,Y1,X2,Y2", help="with --target-region: a box in the map's pixels")
    group.add_argument("--region-mask", metavar="FILE.npy", help="with --target-region: weights [H, W] over the map")
    group.add_argument("--output", help="the output the target or seed lies on (default: the model's decision output)")


def parse_layers(text: str | None) -> list[str] | None:
    return [name for name in text.split(",") if name] or None if text else None


def explain_options(args: argparse.Namespace) -> ExplainOptions:
    """The ExplainOptions that ``add_explain_options``' flags ask for."""
    layers = parse_layers(args.layers)
    target, output = target_from_args(args)
    seed = load_array(args.seed, "--seed") if args.seed else None
    return ExplainOptions(layers=tuple(layers) if layers else None, target=target, output=output, seed=seed,
                          top_k=args.top_k, depth=args.depth, min_share=args.min_share, score=args.score)


def target_from_args(args: argparse.Namespace) -> tuple[Target | None, str | None]:
    """(target, output) of the target flags; each detail flag only with its kind."""
    for flag, value, kind in (("--target-class", args.target_class, "--target-detection"),
                              ("--spread", args.spread, "--target-detection"),
                              ("--region-box", args.region_box, "--target-region"),
                              ("--region-mask", args.region_mask, "--target-region")):
        if value not in (None, False) and getattr(args, kind[2:].replace("-", "_")) is None:
            raise invalid(flag, f"goes with {kind}")
    if args.target_detection is not None:
        return DetectionTarget(args.target_detection, args.target_class, args.spread), args.output
    if args.target_region is not None:
        if args.region_box and args.region_mask:
            raise invalid("--region-box", "give --region-box or --region-mask, not both")
        box = tuple(parse_numbers(args.region_box, "--region-box", float)) if args.region_box else None
        mask = load_array(args.region_mask, "--region-mask") if args.region_mask else None
        return RegionTarget(args.target_region, box, mask), args.output  # type: ignore[arg-type]
    if args.target_element is not None:
        output, index = parse_element(args.target_element)
        if args.output is not None and args.output != output:
            raise invalid("--target-element", f"names output '{output}', but --output is '{args.output}'")
        return ElementTarget(index), output
    return args.target, args.output


def parse_element(text: str) -> tuple[str, tuple[int, ...]]:
    """'output0[0,84,123]' -> ('output0', (0, 84, 123))."""
    name, bracket, rest = text.strip().partition("[")
    if not name or not bracket or not rest.endswith("]"):
        raise invalid("--target-element", f"'{text}' is not OUTPUT[i,j,...], e.g. 'output0[0,84,123]'")
    return name.strip(), tuple(parse_numbers(rest[:-1], "--target-element", int))


def parse_numbers(text: str, flag: str, cast: type) -> list:
    try:
        return [cast(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise invalid(flag, f"'{text}' is not a comma-separated list of numbers") from exc


def load_array(path_text: str, flag: str) -> np.ndarray:
    """A .npy file (no pickles), or an error naming the flag."""
    path = Path(path_text)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise invalid(flag, f"cannot read {path} as a .npy array: {exc}") from exc


def print_summary(explanation, elapsed: float, source: str = "", channels: ChannelLookup | None = None) -> None:
    """The decision and its first-level evidence, one line each; with the atlas's ``channels``, where
    each level-1 channel's top patches are, so a reader can see what the channel responds to."""
    probability = f", p={explanation.probability:.3f}" if explanation.probability is not None else ""
    where = f" from {source}" if source else ""
    explained = explanation.explained
    if explained is None or explained.kind == "class":
        label = f" '{explanation.label}'" if explanation.label is not None else ""
        decision = f"class {explanation.target}{label}: logit {explanation.logit:.4f}"
    else:
        decision = f"{explained.describe(explanation.label)}: score {explanation.logit:.4f}"
    print(f"{decision}{probability}; {len(explanation.nodes)} nodes in {elapsed:.2f} s{where}")
    for node in explanation.level(1):
        print(f"  {node.layer} channel {node.channel}: score {node.score:.4g}, share {node.share:.1%}")
        entry = channels(node.layer, node.channel) if channels is not None else None
        if entry is not None:
            print(f"    top patches: {entry.sheet} row {entry.row} (mean activation {entry.stats.mean:.3g}, "
                  f"fires at {entry.stats.fire_rate:.1%} of positions)")


def detection_line(index: int, detection: DetectedBox) -> str:
    """One decoded box as ``gap-service detections`` and ``client predict`` print it."""
    label = f" '{detection.label}'" if detection.label else ""
    box = ", ".join(f"{v:.1f}" for v in detection.box)
    return (f"  {index:>3}  class {detection.class_index}{label}  score {detection.score:.3f}  box [{box}]  "
            f"({', '.join(detection.outputs)})")


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
