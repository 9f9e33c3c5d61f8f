"""``gap-service atlas MODEL``: what every channel of the default layers responds to, on a reference set."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..atlas import Progress, atlas_dir_for, build_atlas, file_digest, folder_images, reference_set, with_crops
from ..explainer import Explainer
from ..preprocess import Preprocessing, load_preprocessing
from .common import add_input_shape, input_shapes, parse_layers
from .explain import resolve_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("atlas", help="find each channel's top image patches over a reference set")
    parser.add_argument("model", help="an ONNX file, or the name of a model in the bundled repository")
    parser.add_argument("--images", help="folder of images (default: the bundled photos and their augmented crops)")
    parser.add_argument("--crops", type=int, help="seeded augmented crops added per image (default: 15 for the bundled "
                        "photos, 0 for --images)")
    parser.add_argument("--layers", help="comma-separated layer tensors (default: the model's)")
    parser.add_argument("--top", type=int, default=9, help="patches kept per channel (default 9)")
    parser.add_argument("--batch", type=int, default=16, help="images merged into the running top-n at a time (default 16)")
    parser.add_argument("--patch-size", type=int, default=64, help="side of one patch in the sprite sheets (default 64)")
    parser.add_argument("--effective", type=float, metavar="MASS",
                        help="patches show the measured effective field holding this share of the input gradient, "
                        "e.g. 0.5 (default: the whole receptive field)")
    parser.add_argument("--checkpoint-every", type=int, default=256, help="save the running state every N images (default 256)")
    parser.add_argument("--out", help="atlas folder (default: atlas/ beside the model file)")
    parser.add_argument("--preprocessing", help="JSON file with a 'preprocessing' object (default: the model's config.json)")
    add_input_shape(parser)
    parser.set_defaults(run=run)


class ProgressLine:
    """A one-line progress bar on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1
        self.last: Progress | None = None

    def __call__(self, p: Progress) -> None:
        self.last = p
        tenth = 10 * p.done // max(p.total, 1)
        if not self.tty and tenth == self.shown and p.done < p.total:
            return
        self.shown = tenth
        rate = (p.done - p.resumed_from) / max(p.elapsed, 1e-9)
        eta = (p.total - p.done) / rate if rate else 0.0
        resumed = f", resumed at {p.resumed_from}" if p.resumed_from else ""
        line = f"atlas: {p.done}/{p.total} images ({p.skipped} skipped{resumed}), {rate:.1f} images/s, eta {eta:.0f} s"
        print(("\r" if self.tty else "") + line, end="" if self.tty and p.done < p.total else "\n", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    path, config = resolve_model(args)
    preprocessing = load_preprocessing(args.preprocessing) if args.preprocessing else (
        config.preprocessing if config else Preprocessing())
    shapes = input_shapes(args, [s.name for s in Explainer(path).inputs]) if args.input_shape else (
        config.input_shape if config else None)
    explainer = Explainer(path, input_shapes=shapes, output=config.output if config else None,
                          name=config.name if config else path.stem, layers=config.layers if config else None)
    images = with_crops(folder_images(args.images), args.crops or 0) if args.images else reference_set(
        15 if args.crops is None else args.crops)
    out = Path(args.out) if args.out else atlas_dir_for(path)
    progress = ProgressLine()
    started = time.perf_counter()
    atlas = build_atlas(explainer, images, preprocessing, out, digest=file_digest(path), layers=parse_layers(args.layers),
                        top=args.top, batch=args.batch, patch_size=args.patch_size,
                        checkpoint_every=args.checkpoint_every, effective=args.effective, on_progress=progress)
    elapsed = time.perf_counter() - started
    scan = progress.last.elapsed if progress.last else 0.0
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    channels = sum(len(layer.channels) for layer in atlas.layers.values())
    print(f"atlas of {len(atlas.layers)} layers, {channels} channels, top {atlas.top}, from {atlas.image_count} images "
          f"in {elapsed:.1f} s ({scan:.1f} s decoding and forward passes, {elapsed - scan:.1f} s set-up, fields and "
          f"sheets): {out} ({size / 2**20:.1f} MiB)")
    for layer in atlas.layers.values():
        field, effective = layer.field, layer.effective_field
        where = (f"receptive field {field.rows.size}x{field.cols.size} px, stride {field.rows.jump}"
                 + (" (+ global context)" if field.global_context else "")
                 + (f", effective {effective.rows.size}x{effective.cols.size} px" if effective else "")
                 ) if field else f"whole pictures: {layer.field_note}"
        print(f"  {layer.name}: {len(layer.channels)} channels, {where}")
    if atlas.skipped:
        listed = ", ".join(s["name"] for s in atlas.skipped[:5]) + (", ..." if len(atlas.skipped) > 5 else "")
        print(f"skipped {len(atlas.skipped)} unreadable image(s): {listed}", file=sys.stderr)
    return 0
