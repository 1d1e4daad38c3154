"""The ``xcit`` command: one entry point, one module per subcommand.

Every subcommand accepts ``--config FILE.yaml`` whose keys are the subcommand's long option names
(dashes or underscores); the command line overrides the file.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, each exposing ``register(subparsers)``; they are imported lazily so that
# `xcit models` does not pay for the training stack.
SUBCOMMANDS = ["xcit.cli.models", "xcit.cli.train", "xcit.cli.evaluate", "xcit.cli.predict", "xcit.cli.attention", "xcit.cli.embed", "xcit.cli.export", "xcit.cli.segment", "xcit.cli.bench", "xcit.cli.dino", "xcit.cli.detect"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="xcit", description="Cross-Covariance Image Transformers")
    parser.add_argument("--version", action="version", version=f"xcit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import parse_args

    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"xcit {args.command}: error: {err}", file=sys.stderr)
        return 2
