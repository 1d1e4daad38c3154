"""Config files for CLI subcommands: YAML keys become option defaults, the command line wins."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML file of option values (command line overrides)")
    parser.set_defaults(_parser=parser)


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """Option values from a YAML mapping, validated against ``parser``'s options."""
    if not path.is_file():
        raise SystemExit(f"{parser.prog}: error: config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"{parser.prog}: error: config file {path} is not valid YAML: {err}")
    if not isinstance(data, dict):
        raise SystemExit(f"{parser.prog}: error: config file {path} must hold a mapping of option: value")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "_parser")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise SystemExit(f"{parser.prog}: error: unknown option {key!r} in {path}; known: {', '.join(sorted(known))}")
        action = known[dest]
        if action.type is not None and value is not None and not isinstance(value, list):
            value = action.type(value)
        elif action.type is not None and isinstance(value, list):
            value = [action.type(v) for v in value]
        if action.choices is not None and value is not None and value not in action.choices:
            raise SystemExit(f"{parser.prog}: error: {key}={value!r} in {path}; choose from {list(action.choices)}")
        values[dest] = value
    return values


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; when the chosen subcommand got ``--config``, re-parse with the file's defaults."""
    args = parser.parse_args(argv)
    sub = getattr(args, "_parser", None)
    if sub is not None and getattr(args, "config", None) is not None:
        values = load_config(args.config, sub)
        # Positional arguments given in the file are supplied only when absent from the command line.
        sub.set_defaults(**values)
        for action in sub._actions:
            if action.dest in values and not action.option_strings:
                action.nargs = "*" if action.nargs in ("+", "*") else "?"
        args = parser.parse_args(argv)
    return args
