"""``gap-service client``: call a gap-service server (``gap-service serve``) over gRPC.

    gap-service client models --server localhost:50051
    gap-service client explain --server localhost:50051 ppocr_cls line.png --html report.html

``explain`` prints the same summary and writes the same HTML/PNG/JSON report as the local
``gap-service explain``, from the tree the server computed; where the level-1 channels' top
patches are comes from the server's atlas (GetChannel). Several inputs (or folders of them) go
``--batch`` per request (ExplainRequest.inputs; at most the model's limits.max_batch_inputs), with
a progress bar, one summary line and one report file per input, as locally; an input the server
refuses is reported and the rest of its request sent again. ``predict`` takes several inputs too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..atlas import ChannelEntry
from ..errors import GapError, invalid
from .common import (ChannelLookup, add_explain_options, add_inputs_argument, chunks, detection_line, explain_options,
                     input_paths, output_names, prepare_output_dirs, print_batch_end, print_summary, progress_bar,
                     summary_line, write_named_outputs, write_outputs)

Result = TypeVar("Result")
_INPUT_FIELD = re.compile(r"^(?:request\.)?inputs\[(\d+)\]")

DEFAULT_SERVER = "localhost:50051"
TOKEN_ENV = "GAP_TOKEN"  # the API key, when --token-file is not given (never on the command line: ps shows it)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="call a gap-service server over gRPC",
                                   description="Call a gap-service server (gap.v1.GapService) over gRPC.")
    actions = parser.add_subparsers(dest="action", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--server", default=DEFAULT_SERVER, metavar="HOST:PORT", help=f"server address (default {DEFAULT_SERVER})")
        sub.add_argument("--timeout", type=float, default=120.0, help="deadline of each call in seconds (default 120)")
        security = sub.add_argument_group("security (docs/security.md)")
        security.add_argument("--tls", action="store_true", help="connect with TLS, checking the server against the system's CAs")
        security.add_argument("--tls-ca", type=Path, metavar="PEM", help="TLS, checking the server against this CA instead")
        security.add_argument("--tls-cert", type=Path, metavar="PEM", help="mTLS: this client certificate (with --tls-key)")
        security.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
        security.add_argument("--token-file", type=Path, metavar="FILE",
                              help=f"send the API key in FILE (default: ${TOKEN_ENV} when set; implies TLS)")
        return sub

    add("health", "print the server's grpc.health.v1 status")
    add("models", "list the served models")
    model = add("model", "describe one model: inputs, layers, labels, preprocessing, limits")
    model.add_argument("model")
    predict = add("predict", "classify inputs (a detector: its boxes)")
    predict.add_argument("model")
    add_inputs_argument(predict)
    predict.add_argument("--top-k", type=int, default=5)
    explain = add("explain", "explain inputs and write the reports")
    explain.add_argument("model")
    add_inputs_argument(explain)
    add_explain_options(explain)
    explain.add_argument("--stream", action="store_true", help="use ExplainStream and report each level as it arrives")
    parser.set_defaults(run=run)


def _input(path_text: str | Path) -> dict:
    path = Path(path_text)
    if not path.is_file():
        raise invalid("input", f"file not found: {path}")
    if path.suffix == ".npy":
        try:
            return {"tensor": np.load(path, allow_pickle=False)}
        except (OSError, ValueError) as exc:
            raise invalid("input", f"cannot read {path} as a .npy tensor: {exc}") from exc
    return {"image": path.read_bytes()}


def _item(path: Path) -> bytes | np.ndarray:
    """One of several inputs as the client sends it: the encoded image's bytes, or the tensor."""
    value = _input(path)
    return value["tensor"] if "tensor" in value else value["image"]


def _requests(batch: Sequence[Path], call: Callable[[list], list[Result]],
              failures: list[tuple[Path, str]]) -> list[tuple[Path, Result]]:
    """``call`` on the batch's inputs (one request): an input that cannot be read, or that the server
    refuses by name (INVALID_ARGUMENT on inputs[i]), joins ``failures`` and the rest is sent again."""
    import grpc

    from ..client import bad_request

    pending = []
    for path in batch:
        try:
            pending.append((path, _item(path)))
        except GapError as exc:
            failures.append((path, exc.message))
    while pending:
        try:
            return list(zip([path for path, _ in pending], call([item for _, item in pending]), strict=True))
        except grpc.RpcError as exc:
            named = [int(m.group(1)) for field, _ in bad_request(exc) if (m := _INPUT_FIELD.match(field))]
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or not named:
                raise
            path, _ = pending.pop(named[0])
            failures.append((path, _INPUT_FIELD.sub("input", exc.details() or "")))  # its index in that request aside
    return []


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        return args.token_file.read_text().strip()
    except OSError as exc:
        raise invalid("--token-file", f"cannot read {args.token_file}: {exc.strerror or exc}") from exc


def run(args: argparse.Namespace) -> int:
    import grpc

    from ..client import GapClient, bad_request

    try:
        client = GapClient(args.server, timeout=args.timeout, tls=args.tls, root_certificates=args.tls_ca,
                           client_cert=args.tls_cert, client_key=args.tls_key, token=_token(args))
    except (OSError, ValueError) as exc:  # a certificate file that cannot be read; a cert without its key
        raise GapError(f"cannot set up the connection: {exc}") from exc
    with client:
        try:
            return ACTIONS[args.action](client, args)
        except grpc.RpcError as exc:
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
    inputs, several = input_paths(args.input)
    if several:
        return _predict_several(client, args, inputs)
    prediction = client.predict(args.model, top_k=args.top_k, **_input(inputs[0]))
    for index, label, logit, probability in prediction.classes:
        print(f"{index}\t{label}\tlogit {logit:.4f}\tp {probability:.4f}")
    for index, detection in enumerate(prediction.detections):
        print(detection_line(index, detection))
    return 0


def _predict_several(client, args, inputs: list[Path]) -> int:
    """One line per class (and box) of each input, the input's path first; --batch inputs per request."""
    failures: list[tuple[Path, str]] = []
    for batch in chunks(inputs, args.batch):
        for path, prediction in _requests(batch, lambda items: client.predict_many(args.model, items, top_k=args.top_k),
                                          failures):
            for index, label, logit, probability in prediction.classes:
                print(f"{path}\t{index}\t{label}\tlogit {logit:.4f}\tp {probability:.4f}")
            for index, detection in enumerate(prediction.detections):
                print(f"{path}\t{detection_line(index, detection).strip()}")
    for path, message in failures:
        print(f"{path}: error: {message}", file=sys.stderr)
    return 2 if failures else 0


def _explain(client, args) -> int:
    inputs, several = input_paths(args.input)
    if several:
        return _explain_several(client, args, inputs)
    args.input = str(inputs[0])
    options = dict(options=explain_options(args), cams=True, picture=True)
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
    missing: list[str] = []
    print_summary(explanation, time.perf_counter() - started, args.server, _server_channels(client, args, missing))
    for reason in dict.fromkeys(missing):
        print(f"no channel patches: {reason}")
    write_outputs(explanation, args)
    return 0


def _explain_several(client, args, inputs: list[Path]) -> int:
    """--batch inputs per Explain (or ExplainStream) request; see the module docstring."""
    options = dict(options=explain_options(args), cams=True, picture=True)
    names = dict(zip(inputs, output_names(inputs)))
    folders = prepare_output_dirs(args)
    failures: list[tuple[Path, str]] = []
    done = 0
    bar = progress_bar(len(inputs), f"explaining on {args.server}")
    started = time.perf_counter()

    def streamed(items: list) -> list:
        """ExplainStream: each input's levels as they come (on the bar), its tree when done."""
        trees: dict[int, object] = {}
        for level in client.explain_stream(args.model, inputs=items, **options):
            if level.done:
                trees[level.input] = level.explanation
            else:
                bar.set_postfix_str(f"input {level.input} level {level.level}", refresh=True)
        return [trees[index] for index in range(len(items))]

    def unary(items: list) -> list:
        return client.explain_many(args.model, items, **options)

    for batch in chunks(inputs, args.batch):
        for path, explanation in _requests(batch, streamed if args.stream else unary, failures):
            done += 1
            bar.write(summary_line(path, explanation), file=sys.stdout)
            write_named_outputs(explanation, args, names[path])
        bar.update(len(batch))
    return print_batch_end(bar, done, failures, time.perf_counter() - started, folders)


def _server_channels(client, args: argparse.Namespace, missing: list[str]) -> ChannelLookup:
    """GetChannel without pixels; what the server's atlas lacks (NOT_FOUND says why) goes to ``missing``."""
    import grpc

    def lookup(layer: str, channel: int) -> ChannelEntry | None:
        try:
            return client.get_channel(args.model, layer, channel, timeout=args.timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            missing.append(exc.details())
            return None

    return lookup


ACTIONS = {"health": _health, "models": _models, "model": _model, "predict": _predict, "explain": _explain}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(sorted(ACTIONS)))
