"""The ``xcit`` command: one entry point, one module per subcommand.

Every subcommand accepts ``--config FILE.yaml`` whose keys are the subcommand's long option names
(dashes or underscores); several ``--config`` files apply in order (a later file wins) and the command
line overrides them all. A usage mistake is one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, each exposing ``register(subparsers)``; they are imported lazily so that
# `xcit models` does not pay for the training stack.
SUBCOMMANDS = ["xcit.cli.models", "xcit.cli.train", "xcit.cli.evaluate", "xcit.cli.predict", "xcit.cli.attention", "xcit.cli.embed", "xcit.cli.export", "xcit.cli.segment", "xcit.cli.bench", "xcit.cli.dino", "xcit.cli.detect"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away); subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="xcit", description="Cross-Covariance Image Transformers")
    parser.add_argument("--version", action="version", version=f"xcit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import parse_args

    parser = build_parser()
    try:
        args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise  # --help, --version and argparse's own errors have printed and chosen their status
        print(stop.code, file=sys.stderr)  # a config file error, already one line
        return 2
    from ..train.run import NonFiniteLossError

    name = _command_name(args)
    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as err:
        print(f"{name}: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder that cannot be read or written: say which, never a traceback
        where = f": {err.filename}" if err.filename else ""
        print(f"{name}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130


def _command_name(args: argparse.Namespace) -> str:
    """``xcit detect train`` for a nested subcommand, ``xcit train`` for a plain one."""
    action = getattr(args, f"{args.command}_command", None)
    return f"xcit {args.command}" + (f" {action}" if isinstance(action, str) else "")
