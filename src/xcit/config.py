"""Typed options of the configuration dataclasses (``xcit train``, ``xcit dino``).

A field is declared with :func:`option` (default, help text, group, choices); its annotation
(``int``, ``float | None``, ``list[float]``...) is its type. :func:`coerce` is the one place where a
value a user wrote (a YAML file, a Python dict given to ``resolve_config``) becomes a typed option
value; the command line uses the same types through argparse. Every mistake is a one-line
``ValueError`` naming the option. :func:`read_yaml` is the one reader of YAML files a user wrote. This module
imports nothing else of :mod:`xcit`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def option(default: Any, help: str, group: str, choices: tuple | None = None, **kw) -> Any:
    """A dataclass field with the metadata the command line is generated from (help, group, choices, nargs)."""
    meta = {"help": help, "group": group, "choices": choices, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_kind(annotation: Any) -> tuple[type | None, bool]:
    """(element type, is list) of a field annotation such as ``int | None`` or ``list[float]``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list}, {})  # annotations are postponed strings
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    base = args[0] if args else annotation
    if typing.get_origin(base) is list:
        return typing.get_args(base)[0], True
    return base, False


def coerce(option: str, value: Any, kind: Callable[[str], Any]) -> Any:
    """``value`` as the option's ``kind``; ``ValueError`` naming both if it is not one.

    Integers must be integral (``2.5`` is refused, never truncated; ``2.0`` and ``"2"`` are 2) and
    booleans are not numbers: YAML's ``yes`` for a count is a mistake, not 1.
    """
    def fail(expected: str) -> ValueError:
        return ValueError(f"{option}: expected {expected}, got {value!r}")

    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail("an integer" if kind is int else "a number")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise fail("an integer")
            return int(value)
        try:
            return kind(value)
        except ValueError:
            raise fail("an integer" if kind is int else "a number") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if isinstance(value, (dict, list, tuple)):
        raise fail("a single value")
    try:
        return kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise fail(f"a valid value ({err})") from None


def coerce_fields(values: dict[str, Any], fields: Iterable[dataclasses.Field]) -> dict[str, Any]:
    """``values`` (keys naming ``fields``) with each value coerced to its field's type; ``None`` stays ``None``
    (validation decides whether the option may be unset), a single value for a list field becomes a list."""
    kinds = {}
    for f in fields:  # a field's own parser (metadata "type", e.g. an integer or the word none) wins
        kind, is_list = field_kind(f.type)
        kinds[f.name] = (f.metadata.get("type", kind), is_list)
    out = {}
    for key, value in values.items():
        if key not in kinds or value is None:
            out[key] = value
            continue
        kind, is_list = kinds[key]
        if kind is None or kind is typing.Any:
            out[key] = value
        elif is_list:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            out[key] = [coerce(key, v, kind) for v in items]
        else:
            out[key] = coerce(key, value, kind)
    return out


def read_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """The YAML document of a file a user wrote, read strictly: one-line errors naming the file (and line).

    A file that is missing, not UTF-8 text or not valid YAML, and a mapping that repeats a key (YAML
    itself would keep the last value and silently drop the first), are each a ``ValueError``
    (``FileNotFoundError`` for a missing file) that says what was expected. An empty file reads as ``None``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        kind = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {path} {kind} (expected a YAML file)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at line {line}); "
                         "expected a YAML file saved as UTF-8") from None
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader that also refuses duplicate keys
    except DuplicateKeyError as err:
        raise ValueError(f"{what} {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML{at}: {problem}") from None


class DuplicateKeyError(ValueError):
    """A YAML mapping that holds a key twice."""


@functools.cache
def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key that a mapping holds twice."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the base loader reports it
                        continue
                    if first is not None:
                        raise DuplicateKeyError(f"the key {key!r} appears twice, at lines {first} and "
                                                f"{key_node.start_mark.line + 1} (expected each key once)")
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return StrictLoader
