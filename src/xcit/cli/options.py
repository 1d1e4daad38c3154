"""The command line of the options dataclasses: one flag per field, the training commands' runner.

Every training command (``xcit train``, ``xcit dino``, ``xcit detect train``, ``xcit segment train``) is
made by :func:`add_training_command` from its task package (``options_type``, ``resolve_config``,
``train``), so each has the same shared options, ``--config``, ``--print-config`` and the same runner.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

from ..config import field_kind
from .config import add_config_option

_INTERNAL = {"func", "command", "config", "_parser", "print_config", "detect_command", "segment_command", "training",
             "json"}
# Option groups of the training commands, in the order --help shows them (the shared run options last).
TITLES = {"data": "data", "model": "model", "optim": "optimisation", "augment": "augmentation and regularisation",
          "distill": "distillation", "eval": "evaluation", "run": "run (the same options in every training command)"}


def add_training_command(sub: argparse._SubParsersAction, name: str, package: str, *, help: str, description: str,
                         titles: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The subcommand ``name`` training the task of ``package`` (e.g. ``xcit.classify``, which exports ``OPTIONS``,
    its options dataclass, ``resolve_config`` and ``train``): a flag for every option, ``--print-config``, ``--json``
    and ``--config``; run by :func:`run_training`."""
    import importlib

    module = importlib.import_module(package)
    p = sub.add_parser(name, help=help, description=description)
    add_field_options(p, fields(module.OPTIONS), {**TITLES, **(titles or {})})
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the run's result.json as one line of JSON at the end")
    add_config_option(p)
    p.set_defaults(func=run_training, training=package)
    return p


def run_training(args: argparse.Namespace) -> int:
    """Resolve the options given (a resumed run starts from its saved ones) and train, or print them."""
    import importlib

    package = importlib.import_module(args.training)
    cfg = package.resolve_config(training_options(args))
    if args.print_config:
        print_config(cfg)
        return 0
    result = package.train(cfg)
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json.loads((result.run_dir / "result.json").read_text())))
    return 0


def add_field_options(p: argparse.ArgumentParser, config_fields: list, titles: dict[str, str]) -> None:
    """One flag per dataclass field (:func:`xcit.config.option` metadata: help, group, choices, nargs, type), grouped under ``titles``
    (the shared run options last), and the old spellings of renamed options as hidden aliases.

    Flags default to ``argparse.SUPPRESS``: only the options given end up in the namespace.
    """
    import dataclasses

    from ..train.options import RENAMED_OPTIONS

    order = list(titles)
    ordered = sorted(config_fields, key=lambda f: order.index(f.metadata["group"]) if f.metadata["group"] in order
                     else len(order) - 1)
    groups: dict[str, argparse._ArgumentGroup] = {}
    names = {f.name for f in config_fields}
    for f in ordered:
        meta = f.metadata
        group = groups.setdefault(meta["group"], p.add_argument_group(titles.get(meta["group"], meta["group"])))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        # an unset option's default is in its help text ("default: the dataset's", ...)
        help_text = (meta["help"] if default is None else f"{meta['help']} [default: {shown}]").replace("%", "%%")
        aliases = [old for old, new in RENAMED_OPTIONS.items() if new == f.name and old not in names]
        for flags, text in ((["--" + f.name.replace("_", "-")], help_text),
                            *((["--" + old.replace("_", "-")], argparse.SUPPRESS) for old in aliases)):
            _add_field_flag(group, flags, f, meta, text)


def _add_field_flag(group, flags: list[str], f, meta, help_text: str) -> None:
    kind, is_list = field_kind(f.type)
    kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if f.name == "resume":
        group.add_argument(*flags, nargs="?", const="auto", metavar="RUN", **kwargs)
    elif kind is bool:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    else:
        group.add_argument(*flags, type=meta.get("type", kind), nargs=meta.get("nargs", "+") if is_list else None,
                           **kwargs)


def given_options(args: argparse.Namespace) -> dict:
    """The options set on the command line or in the --config file (nothing else is in ``args``)."""
    return {k: v for k, v in vars(args).items() if k not in _INTERNAL}


def training_options(args: argparse.Namespace) -> dict:
    """The options given; a resumed run (``--resume``) starts from the options saved in its folder."""
    values = given_options(args)
    if values.get("resume"):  # what is given again is compared with the saved values (and reported)
        from ..train.options import saved_run_options

        values = {**saved_run_options(values["resume"], values.get("output")), **values}
    return values


def print_config(cfg) -> None:
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
