"""``gap-service explain MODEL INPUT [INPUT ...]``: explain images (or preprocessed .npy tensors).

One input: its summary and report files, with each level reported as it is computed. Several (or a
folder of them): explained in chunks of ``--batch`` together (``Explainer.run``, the machinery of
``Explainer.explain_many``: one stacked forward run and one stacked run per level pair for the
chunk), a progress bar on stderr, one summary line per input, one report file per input in the
folders --json/--html/--png name; an input that fails is reported and the others go on (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..atlas import Atlas, AtlasNotFoundError, ChannelEntry
from ..errors import GapError, invalid
from ..explainer import Explainer, ExplainJob
from ..explanation import Explanation, Node
from ..preprocess import Preprocessing, decode_image, load_preprocessing, preprocess
from ..repository import BUNDLED_REPOSITORY, ModelConfig
from .common import (ChannelLookup, add_explain_options, add_input_shape, add_inputs_argument, chunks, explain_options,
                     input_paths, input_shapes, output_names, prepare_output_dirs, print_batch_end, print_summary,
                     progress_bar, summary_line, write_named_outputs, write_outputs)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("explain", help="decompose a model's decision on inputs into trees of evidence")
    add_model_arguments(parser, several=True)
    add_explain_options(parser)
    parser.add_argument("--max-batch-mb", type=int, help="memory bound of one batched gradient run (default: 256 on CPU, 4096 on CUDA)")
    parser.add_argument("--atlas", metavar="DIR", help="the model's channel atlas, whose patches the report shows per node "
                        "(default: atlas/ beside the model file, when built; see gap-service atlas)")
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """MODEL and INPUT (with ``several``: INPUT [INPUT ...] and --batch), the input shape and preprocessing flags."""
    parser.add_argument("model", help="an ONNX file, or the name of a model in the bundled repository")
    if several:
        add_inputs_argument(parser)
    else:
        parser.add_argument("input", help="an image (PNG/JPEG/...) or a preprocessed .npy tensor")
    add_input_shape(parser)
    group = parser.add_argument_group("preprocessing (default: the model's config.json when it has one)")
    group.add_argument("--preprocessing", help="JSON file with a 'preprocessing' object (or a model config.json)")
    group.add_argument("--resize", choices=("exact", "shorter_side", "fit_height"))
    group.add_argument("--size", help="resize target, H,W (or the shorter side)")
    group.add_argument("--crop", help="center crop H,W")
    group.add_argument("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")
    group.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    group.add_argument("--scale", type=float, help="pixel scale before mean/std (default 1/255)")
    group.add_argument("--channel-order", choices=("RGB", "BGR"))
    group.add_argument("--layout", choices=("NCHW", "NHWC"))
    parser.add_argument("--labels", help="text file with one class label per line")


def _numbers(text: str | None, cast=float):
    return None if text is None else tuple(cast(v) for v in text.split(",") if v)


def resolve_model(args: argparse.Namespace) -> tuple[Path, ModelConfig | None]:
    """An ONNX path (with its repository config.json if it sits in one) or a bundled model name."""
    path = Path(args.model)
    if not path.exists() and (BUNDLED_REPOSITORY / args.model / "config.json").is_file():
        from ..repository import load_repository

        entry = load_repository(BUNDLED_REPOSITORY)[args.model]
        return entry.path, entry.config
    config_path = path.parent.parent / "config.json"
    if path.suffix == ".onnx" and config_path.is_file():
        return path, ModelConfig.from_file(config_path)
    return path, None


def preprocessing_from_args(args: argparse.Namespace, config: ModelConfig | None) -> Preprocessing:
    base = load_preprocessing(args.preprocessing) if args.preprocessing else (config.preprocessing if config else Preprocessing())
    overrides = {
        "resize": args.resize, "size": _numbers(args.size, int), "crop": _numbers(args.crop, int),
        "mean": _numbers(args.mean), "std": _numbers(args.std), "scale": args.scale,
        "channel_order": args.channel_order, "layout": args.layout,
    }
    merged = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    merged.validate()
    return merged


def load_input(args: argparse.Namespace, config: ModelConfig | None,
               path: Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(model input tensor, display picture or None) of ``path`` (default: the INPUT argument)."""
    path = Path(args.input) if path is None else path
    if not path.is_file():
        raise invalid("input", f"file not found: {path}")
    if path.suffix == ".npy":
        try:
            tensor = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise invalid("input", f"cannot read {path} as a .npy tensor: {exc}") from exc
        return tensor, None
    return preprocess(decode_image(path, field_name="input"), preprocessing_from_args(args, config))


def load_labels(args: argparse.Namespace, config: ModelConfig | None) -> tuple[str, ...]:
    if args.labels:
        try:
            return tuple(line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip())
        except OSError as exc:
            raise invalid("--labels", f"cannot read {args.labels}: {exc}") from exc
    return config.labels if config else ()


def build_explainer(args: argparse.Namespace, path: Path, config: ModelConfig | None, tensor: np.ndarray) -> Explainer:
    """The model at the input's shape (or --input-shape), with the config's labels, default layers and task."""
    output = args.output or (config.output if config else None)
    probe = Explainer(path, output=output)
    shapes = input_shapes(args, [s.name for s in probe.inputs]) or {probe.inputs[0].name: tuple(tensor.shape)}
    return Explainer(path, output=output, input_shapes=shapes, name=config.name if config else path.stem,
                     labels=load_labels(args, config), layers=config.layers if config else None,
                     atlas_dir=args.atlas, task=config.task if config else None)


def progress(level: int, nodes: list[Node], tree: Explanation) -> None:
    print(f"  level {level}: {len(nodes)} node(s)", file=sys.stderr, flush=True)


def model_atlas(explainer: Explainer, explicit: bool) -> tuple[Atlas | None, str | None]:
    """The model's atlas, or None and how to build one; an ``explicit`` --atlas that is missing is an error."""
    try:
        return explainer.atlas(required=True), None
    except AtlasNotFoundError as exc:
        if explicit:
            raise
        return None, str(exc)


def covered(atlas: Atlas) -> ChannelLookup:
    """``atlas.entry``, with None for the layers the atlas does not cover."""
    def lookup(layer: str, channel: int) -> ChannelEntry | None:
        try:
            return atlas.entry(layer, channel)
        except AtlasNotFoundError:
            return None

    return lookup


def run(args: argparse.Namespace) -> int:
    inputs, several = input_paths(args.input)
    if several:
        return run_several(args, inputs)
    args.input = str(inputs[0])
    path, config = resolve_model(args)
    tensor, picture = load_input(args, config)
    explainer = build_explainer(args, path, config, tensor)
    options = replace(explain_options(args), max_batch_bytes=args.max_batch_mb * 2**20 if args.max_batch_mb else None)
    atlas, missing = model_atlas(explainer, explicit=args.atlas is not None)  # a stale one fails before the work
    print(f"explaining {path} with depth {options.depth}, top_k {options.top_k}", file=sys.stderr)
    started = time.perf_counter()
    explanation = explainer.explain(tensor, options, picture=picture, on_level=progress)
    elapsed = time.perf_counter() - started
    print_summary(explanation, elapsed, channels=covered(atlas) if atlas is not None else None)
    if missing:
        print(f"no channel patches: {missing}")
    write_outputs(explanation, args, atlas)
    return 0


def run_several(args: argparse.Namespace, inputs: list[Path]) -> int:
    """Explain ``inputs`` in chunks of ``--batch`` (one engine call each); see the module docstring."""
    path, config = resolve_model(args)
    options = replace(explain_options(args), max_batch_bytes=args.max_batch_mb * 2**20 if args.max_batch_mb else None)
    options.validate()  # a bad option fails at once, not once per input
    batches = list(chunks(list(zip(inputs, output_names(inputs))), args.batch))
    folders = prepare_output_dirs(args)
    explainer: Explainer | None = None
    atlas = None
    failures: list[tuple[Path, str]] = []
    done = 0
    print(f"explaining {len(inputs)} inputs with {path}, depth {options.depth}, top_k {options.top_k}, "
          f"{args.batch} at a time", file=sys.stderr)
    bar = progress_bar(len(inputs), "explaining")
    started = time.perf_counter()
    for batch in batches:
        loaded = []
        for item, name in batch:
            try:
                tensor, picture = load_input(args, config, item)
            except GapError as exc:
                failures.append((item, exc.message))
                bar.update(1)
                continue
            if explainer is None:  # the model at the first input's shape, as for one input
                explainer = build_explainer(args, path, config, tensor)
                atlas, _ = model_atlas(explainer, explicit=args.atlas is not None)
            loaded.append((item, name, ExplainJob(tensor, options, picture=picture)))
        if not loaded:
            continue
        results = explainer.run([job for _, _, job in loaded])  # type: ignore[union-attr]
        for (item, name, _), result in zip(loaded, results):
            if isinstance(result, GapError):
                failures.append((item, result.message))
            elif isinstance(result, Exception):
                raise result
            else:
                done += 1
                bar.write(summary_line(item, result), file=sys.stdout)
                write_named_outputs(result, args, name, atlas)
        bar.update(len(loaded))
    return print_batch_end(bar, done, failures, time.perf_counter() - started, folders)

