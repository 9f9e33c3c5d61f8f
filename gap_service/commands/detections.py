"""``gap-service detections MODEL INPUT``: the boxes a detector finds in one image, best first.

Their indices are what ``gap-service explain --target-detection I`` explains. The model's
config.json declares how its outputs decode (its ``task``, docs/targets.md); a single-output
YOLOv5/YOLOv8 head is recognised from its shape.
"""

from __future__ import annotations

import argparse
import json

from .common import detection_line
from .explain import add_model_arguments, build_explainer, load_input, resolve_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("detections", help="list the boxes a detector finds in one input (the indices "
                                                      "explain --target-detection takes)")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run, output=None, atlas=None)


def run(args: argparse.Namespace) -> int:
    path, config = resolve_model(args)
    tensor, _ = load_input(args, config)
    explainer = build_explainer(args, path, config, tensor)
    found = explainer.detections(tensor)
    if args.json:
        print(json.dumps([{"index": i, **d._asdict()} for i, d in enumerate(found)], indent=2))
        return 0
    print(f"{len(found)} detection(s) in {args.input}" + (":" if found else ""))
    for index, detection in enumerate(found):
        print(detection_line(index, detection))
    return 0
