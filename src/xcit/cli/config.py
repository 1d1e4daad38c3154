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
        if isinstance(value, bool) and action.choices is not None and value not in action.choices:
            raise SystemExit(f"{parser.prog}: error: {key}: {value} in {path}: YAML reads unquoted off/on/no/yes "
                             f"as a boolean; write one of {list(action.choices)} (quoted if need be)")
        if action.choices is not None and value is not None and value not in action.choices:
            raise SystemExit(f"{parser.prog}: error: {key}={value!r} in {path}; choose from {list(action.choices)}")
        values[dest] = value
    return values


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a subcommand's ``--config FILE`` supplies defaults before the command line is read."""
    sub = _chosen_subparser(parser, argv)
    config = _config_path(argv)
    if sub is not None and config is not None:
        values = load_config(config, sub)
        sub.set_defaults(**values)
        for action in sub._actions:  # positionals given in the file become optional on the command line
            if action.dest in values and not action.option_strings:
                action.nargs = "*" if action.nargs in ("+", "*") else "?"
                action.default = values[action.dest]
    return parser.parse_args(argv)


def _chosen_subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The innermost subcommand parser ``argv`` selects (``xcit segment train`` -> the ``train`` parser)."""
    choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    index = next((i for i, tok in enumerate(argv) if not tok.startswith("-")), None)
    sub = choices.get(argv[index]) if index is not None else None
    if sub is None:
        return None
    return _chosen_subparser(sub, argv[index + 1:]) or sub


def _config_path(argv: list[str]) -> Path | None:
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if tok.startswith("--config="):
            return Path(tok.split("=", 1)[1])
    return None
