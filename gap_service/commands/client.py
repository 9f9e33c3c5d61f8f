"""``gap-service client``: call a gap-service server (``gap-service serve``) over gRPC.

    gap-service client models --server localhost:50051
    gap-service client explain --server localhost:50051 ppocr_cls line.png --html report.html

``explain`` prints the same summary and writes the same HTML/PNG/JSON report as the local
``gap-service explain``, from the tree the server computed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import GapError, invalid

DEFAULT_SERVER = "localhost:50051"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="call a gap-service server over gRPC",
                                   description="Call a gap-service server (gap.v1.GapService) over gRPC.")
    actions = parser.add_subparsers(dest="action", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--server", default=DEFAULT_SERVER, metavar="HOST:PORT", help=f"server address (default {DEFAULT_SERVER})")
        sub.add_argument("--timeout", type=float, default=120.0, help="deadline of each call in seconds (default 120)")
        return sub

    add("health", "print the server's grpc.health.v1 status")
    add("models", "list the served models")
    model = add("model", "describe one model: inputs, layers, labels, preprocessing, limits")
    model.add_argument("model")
    predict = add("predict", "classify one input")
    predict.add_argument("model")
    predict.add_argument("input", help="an image (PNG/JPEG) or a preprocessed .npy tensor")
    predict.add_argument("--top-k", type=int, default=5)
    explain = add("explain", "explain one input and write the report")
    explain.add_argument("model")
    explain.add_argument("input", help="an image (PNG/JPEG) or a preprocessed .npy tensor")
    explain.add_argument("--layers", help="comma-separated layer tensors, highest first (default: the model's)")
    explain.add_argument("--target", type=int, help="class index to explain (default: the top-1 class)")
    explain.add_argument("--top-k", type=int, default=5, help="children per node (default 5)")
    explain.add_argument("--depth", type=int, default=3, help="tree depth in layers (default 3)")
    explain.add_argument("--min-share", type=float, default=0.0, help="drop children below this share of their parent")
    explain.add_argument("--score", choices=("net", "positive"), default="net", help="channel ranking (default net)")
    explain.add_argument("--stream", action="store_true", help="use ExplainStream and report each level as it arrives")
    explain.add_argument("--json", dest="json_out", help="write the tree as JSON here")
    explain.add_argument("--html", dest="html_out", help="write a self-contained HTML report here")
    explain.add_argument("--png", dest="png_out", help="write a PNG figure of the top levels here")
    parser.set_defaults(run=run)


def _input(path_text: str) -> dict:
    path = Path(path_text)
    if not path.is_file():
        raise invalid("input", f"file not found: {path}")
    if path.suffix == ".npy":
        try:
            return {"tensor": np.load(path, allow_pickle=False)}
        except (OSError, ValueError) as exc:
            raise invalid("input", f"cannot read {path} as a .npy tensor: {exc}") from exc
    return {"image": path.read_bytes()}


def run(args: argparse.Namespace) -> int:
    import grpc

    from ..client import GapClient

    with GapClient(args.server, timeout=args.timeout) as client:
        try:
            return ACTIONS[args.action](client, args)
        except grpc.RpcError as exc:
            from ..server.errors import bad_request

            print(f"gap-service client {args.action}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            for field, description in bad_request(exc):
                print(f"  {field}: {description}", file=sys.stderr)
            return 1


def _health(client, args) -> int:
    status = client.health(timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def _models(client, args) -> int:
    for model in client.list_models():
        print(f"{model.name}\tversion {model.version}\t{model.num_classes} classes\t{','.join(model.providers)}\t{model.description}")
    return 0


def _model(client, args) -> int:
    from google.protobuf import json_format

    print(json_format.MessageToJson(client.get_model(args.model), indent=2))
    return 0


def _predict(client, args) -> int:
    prediction = client.predict(args.model, top_k=args.top_k, **_input(args.input))
    for index, label, logit, probability in prediction.classes:
        print(f"{index}\t{label}\tlogit {logit:.4f}\tp {probability:.4f}")
    return 0


def _explain(client, args) -> int:
    options = dict(
        layers=[n for n in args.layers.split(",") if n] if args.layers else None, target=args.target, top_k=args.top_k,
        depth=args.depth, min_share=args.min_share, score=args.score, cams=True, picture=True,
    )
    started = time.perf_counter()
    if args.stream:
        explanation = None
        for level in client.explain_stream(args.model, **_input(args.input), **options):
            if not level.done:
                print(f"  level {level.level}: {len(level.nodes)} node(s) after {time.perf_counter() - started:.2f} s",
                      file=sys.stderr, flush=True)
            explanation = level.explanation
        if explanation is None:
            raise GapError("the server sent no levels")
    else:
        explanation = client.explain(args.model, **_input(args.input), **options)
    elapsed = time.perf_counter() - started
    label = f" '{explanation.label}'" if explanation.label is not None else ""
    probability = f", p={explanation.probability:.3f}" if explanation.probability is not None else ""
    print(f"class {explanation.target}{label}: logit {explanation.logit:.4f}{probability}; "
          f"{len(explanation.nodes)} nodes in {elapsed:.2f} s from {args.server}")
    for node in explanation.level(1):
        print(f"  {node.layer} channel {node.channel}: score {node.score:.4g}, share {node.share:.1%}")
    if args.html_out or args.png_out or args.json_out:
        from ..report import write_report

        write_report(explanation, html_path=args.html_out, png_path=args.png_out, json_path=args.json_out)
        for out in (args.html_out, args.png_out, args.json_out):
            if out:
                print(f"wrote {out}")
    return 0


ACTIONS = {"health": _health, "models": _models, "model": _model, "predict": _predict, "explain": _explain}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(sorted(ACTIONS)))
