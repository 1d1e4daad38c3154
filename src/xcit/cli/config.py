"""Config files for CLI subcommands: YAML keys become option defaults, the command line wins.

Values read from a file become typed option values through :func:`xcit.config.coerce` (the same rule
``resolve_config`` applies to Python values); the command line goes through argparse's own ``type=``.
Every mistake is a one-line error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import coerce, read_yaml


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, action="append", default=None, metavar="FILE",
                        help="YAML file of option values; repeatable: files apply in order, a later one overriding "
                             "an earlier one, and the command line overrides them all")
    parser.set_defaults(_parser=parser)


def add_overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: the one way, in every command, to let it replace files that already exist (``what``)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"{what} (without it, a command refuses, before any work, to write over an existing file)")


def require_options(args: argparse.Namespace, *names: str) -> None:
    """``ValueError`` naming the first of ``names`` not given (``None`` or empty) on the command line or in a config file."""
    for name in names:
        if getattr(args, name) in (None, []):
            raise ValueError(f"expected --{name.replace('_', '-')}, got none")


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """Option values from a YAML mapping, validated against ``parser``'s options (one-line errors)."""
    def error(message: str) -> SystemExit:
        return SystemExit(f"{parser.prog}: error: {message}")

    try:
        data = read_yaml(path) or {}
    except (ValueError, OSError) as err:  # missing, a folder, unreadable, not UTF-8, not YAML, a key given twice
        raise error(str(err) if not isinstance(err, OSError) or err.filename is None
                    else f"config file {path}: {err.strerror}") from None
    if not isinstance(data, dict):
        raise error(f"config file {path} must hold a mapping of option: value")
    actions = [a for a in parser._actions if a.dest not in ("help", "config", "_parser")]
    known = {a.dest: a for a in actions}
    # a key may also be an option's flag, e.g. a hidden old spelling (`out:` for `output:`)
    flags = {s.lstrip("-").replace("-", "_"): a for a in actions for s in a.option_strings if s.startswith("--")}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        action = known.get(name) or flags.get(name)
        if action is None:
            raise error(f"unknown option {key!r} in {path}; known: {', '.join(sorted(known))}")
        if action.dest != name:
            print(f"{parser.prog}: note: {key!r} in {path} is now {action.dest.replace('_', '-')!r}", file=sys.stderr)
        dest = action.dest
        if isinstance(value, bool) and action.choices is not None and value not in action.choices:
            raise error(f"{key}: {value} in {path}: YAML reads unquoted off/on/no/yes "
                        f"as a boolean; write one of {list(action.choices)} (quoted if need be)")
        try:
            value = _typed(key, value, action)
        except ValueError as err:
            raise error(f"{err} (in {path})") from None
        if action.choices is not None and value is not None and value not in action.choices:
            raise error(f"{key}={value!r} in {path}; choose from {list(action.choices)}")
        values[dest] = value
    return values


def _typed(key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` as ``action`` would parse it: flags take booleans, typed options their type (lists element-wise)."""
    if value is None:
        return None
    if action.nargs == 0:  # store_true / --x/--no-x
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, dict):
        raise ValueError(f"{key}: expected a value, got the mapping {value!r}")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if not many:
        if isinstance(value, list):
            raise ValueError(f"{key}: expected a single value, got the list {value!r}")
        return value if action.type is None else _coerce(key, value, action.type)
    values = value if isinstance(value, list) else [value]  # `img_size: 224` reads as `--img-size 224`
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise ValueError(f"{key}: expected {action.nargs} values, got {value!r}")
    if action.nargs == "+" and not values:
        raise ValueError(f"{key}: expected at least one value, got {value!r}")
    return values if action.type is None else [_coerce(key, v, action.type) for v in values]


def _coerce(key: str, value: Any, kind) -> Any:
    """:func:`xcit.config.coerce`, except that a ranged option type (:func:`number`) states its own rule."""
    if isinstance(kind, NumberOption):
        try:
            return kind(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{key}: {err}") from None
    return coerce(key, value, kind)


class NumberOption:
    """An option type: an integer or a number within bounds; a mistake is argparse's one-line error."""

    def __init__(self, kind: type, low: float | None, high: float | None, low_open: bool) -> None:
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def rule(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return what if self.high is None else f"{what} <= {self.high:g}"

    def __call__(self, text: Any) -> int | float:
        fail = argparse.ArgumentTypeError(f"expected {self.rule()}, got {text!r}")
        if isinstance(text, bool) or not isinstance(text, (int, float, str)):
            raise fail
        try:
            value = coerce("", text, self.kind)
        except ValueError:
            raise fail from None
        if value != value or value in (float("inf"), float("-inf")):
            raise fail
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise fail
        if self.high is not None and value > self.high:
            raise fail
        return value


def number(kind: type = int, low: float | None = None, high: float | None = None, *,
           low_open: bool = False) -> NumberOption:
    """An option ``type=`` that accepts ``kind`` (int or float) values in ``[low, high]`` (``(low, high]`` with
    ``low_open``; either bound may be None), so that an out-of-range value is refused before anything runs."""
    return NumberOption(kind, low, high, low_open)


#: option types of the counts and sizes most commands take
POSITIVE = number(int, 1)
NON_NEGATIVE = number(int, 0)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a subcommand's ``--config FILE`` options supply defaults before the command line is read.

    Several ``--config`` files apply in the order given: a key in a later file overrides the same key in
    an earlier one; the command line overrides every file.
    """
    sub = _chosen_subparser(parser, argv)
    configs = _config_paths(argv)
    if sub is not None and configs:
        values: dict = {}
        for config in configs:
            values.update(load_config(config, sub))
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


def _config_paths(argv: list[str]) -> list[Path]:
    paths = []
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if tok == "--config" and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif tok.startswith("--config="):
            paths.append(Path(tok.split("=", 1)[1]))
    return paths
