"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

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


def decision_text(explanation) -> str:
    """The explained decision in a few words: "class 3 '270': logit 4.1234, p=0.981"."""
    probability = f", p={explanation.probability:.3f}" if explanation.probability is not None else ""
    explained = explanation.explained
    if explained is None or explained.kind == "class":
        label = f" '{explanation.label}'" if explanation.label is not None else ""
        return f"class {explanation.target}{label}: logit {explanation.logit:.4f}{probability}"
    return f"{explained.describe(explanation.label)}: score {explanation.logit:.4f}{probability}"


def print_summary(explanation, elapsed: float, source: str = "", channels: ChannelLookup | None = None) -> None:
    """The decision and its first-level evidence, one line each; with the atlas's ``channels``, where
    each level-1 channel's top patches are, so a reader can see what the channel responds to."""
    where = f" from {source}" if source else ""
    print(f"{decision_text(explanation)}; {len(explanation.nodes)} nodes in {elapsed:.2f} s{where}")
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


# -- several inputs -------------------------------------------------------------------------------
INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".npy")  # what a folder INPUT contributes
DEFAULT_CHUNK = 8  # inputs per engine call or request (a model's default dynamic_batching.max_batch_size)
OUTPUT_FLAGS = (("--json", "json_out", ".json"), ("--html", "html_out", ".html"), ("--png", "png_out", ".png"))
Item = TypeVar("Item")


def add_inputs_argument(parser: argparse.ArgumentParser) -> None:
    """INPUT [INPUT ...]: files, and folders of them; --batch: how many go together."""
    parser.add_argument("input", nargs="+", metavar="INPUT",
                        help="an image (PNG/JPEG/...) or a preprocessed .npy tensor; several, or folders of them (a "
                             "folder's images and .npy files, sorted by name): then --json/--html/--png name folders, "
                             "with one file per input named after it")
    parser.add_argument("--batch", type=int, default=DEFAULT_CHUNK, metavar="N",
                        help=f"with several inputs, how many are explained together (default {DEFAULT_CHUNK})")


def input_paths(texts: Sequence[str]) -> tuple[list[Path], bool]:
    """The files the INPUT arguments name, and whether they are several (more than one argument, or a
    folder: its images and .npy tensors, sorted by name). A file is taken as named (checked when read)."""
    paths: list[Path] = []
    several = len(texts) > 1
    for text in texts:
        path = Path(text)
        if path.is_dir():
            several = True
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
            if not found:
                raise invalid("input", f"folder {path} has no images ({', '.join(INPUT_SUFFIXES[:-1])}) or .npy tensors")
            paths.extend(found)
        else:
            paths.append(path)
    return paths, several


def chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    if size < 1:
        raise invalid("--batch", f"{size} must be at least 1")
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output name per input, after it: its stem (``cat`` for cat.png); ``cat_png``, ``cat_jpg``
    where stems collide; with a ``_<position>`` where even those do (same names in other folders)."""
    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths]
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name}_{index}" for index, name in enumerate(names)]


def prepare_output_dirs(args: argparse.Namespace) -> list[Path]:
    """With several inputs, --json/--html/--png name folders (made when missing): one file per input."""
    folders = []
    for flag, attribute, _ in OUTPUT_FLAGS:
        value = getattr(args, attribute)
        if value:
            folder = Path(value)
            if folder.exists() and not folder.is_dir():
                raise invalid(flag, f"{folder} is a file: with several inputs, give a folder (one file per input)")
            folder.mkdir(parents=True, exist_ok=True)
            folders.append(folder)
    return folders


def write_named_outputs(explanation, args: argparse.Namespace, name: str, atlas: Atlas | None = None) -> None:
    """The JSON/HTML/PNG files of one of several inputs: ``name`` + the suffix in each asked-for folder."""
    paths = {attribute: Path(getattr(args, attribute)) / f"{name}{suffix}"
             for _, attribute, suffix in OUTPUT_FLAGS if getattr(args, attribute)}
    if not paths:
        return
    from ..report import write_report

    write_report(explanation, html_path=paths.get("html_out"), png_path=paths.get("png_out"),
                 json_path=paths.get("json_out"), atlas=atlas)


def summary_line(path: Path, explanation) -> str:
    """One input's line among several: where from, the decision, the tree's size."""
    return f"{path}: {decision_text(explanation)}; {len(explanation.nodes)} nodes"


def progress_bar(total: int, description: str):
    """A progress bar over inputs on stderr (tqdm); ``bar.write`` prints a line above it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="input", file=sys.stderr, dynamic_ncols=True)


def print_batch_end(bar, done: int, failures: Sequence[tuple[Path, str]], elapsed: float, folders: Sequence[Path]) -> int:
    """Close the bar; the count, the failures (on stderr) and the output folders; 0, or 2 if any input failed."""
    bar.close()
    total = done + len(failures)
    print(f"{done} of {total} input(s) explained in {elapsed:.2f} s ({done / elapsed if elapsed > 0 else 0:.2f}/s)")
    for folder in folders:
        print(f"wrote {done} file(s) to {folder}")
    for path, message in failures:
        print(f"{path}: error: {message}", file=sys.stderr)
    return 2 if failures else 0
