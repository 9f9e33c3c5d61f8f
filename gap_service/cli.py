"""The ``gap-service`` command line: one module per subcommand under gap_service.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import GapError

COMMANDS = ("inspect", "explain", "detections", "evaluate", "serve", "client", "atlas")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gap-service", description="Hierarchical gAP explanations for ONNX CNNs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"gap_service.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.run(args) or 0)
    except GapError as exc:
        print(f"gap-service {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or a runtime failure, not bad input: say so, trace with -v
        if args.verbose:
            raise
        print(f"gap-service {args.command}: internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
