"""A one-model repository of a tests/support architecture (seeded weights, exported to ONNX), for
the throughput benchmark on a machine without the bundled models' kind of network (the GPU check
explains a ResNet-50).

    .venv/bin/python bench/model_repository.py --arch resnet50 --out out/gpu/repository
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT  # noqa: F401 - puts tests/ on the path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from support.models import export_onnx, torch_case

    case = torch_case(args.arch)
    folder = args.out / args.arch / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(export_onnx(case))
    config = {"name": args.arch, "description": f"{args.arch}-shaped network with seeded weights (tests/support/models.py)",
              "input_shape": list(case.input_shape), "task": {"kind": "classification"}}
    (args.out / args.arch / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {folder / 'model.onnx'} (input {list(case.input_shape)})")


if __name__ == "__main__":
    main()
