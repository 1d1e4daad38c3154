"""`xcit train`: every option of :class:`xcit.train.TrainConfig`, from the command line or a YAML file.

``xcit train`` alone trains the Fashion-MNIST preset; ``xcit train --data /imagenet`` the paper's
ImageNet recipe; ``torchrun --nproc_per_node=8 -m xcit train ...`` the same data-parallel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import field_kind
from .config import add_config_option

_INTERNAL = {"func", "command", "config", "_parser", "print_config"}


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config import PRESETS, config_fields

    p = sub.add_parser(
        "train", help="train or fine-tune an XCiT (Fashion-MNIST preset by default; ImageNet-style folders; torchrun)",
        description="Train an XCiT. The defaults shown ('recipe default') are the paper's ImageNet recipe; a preset "
                    f"chosen by the dataset ({', '.join(PRESETS)}) replaces some of them (--print-config shows the "
                    "result), a --config YAML file overrides the preset and the command line overrides both. "
                    "The resolved configuration is saved in the run directory.",
    )
    titles = {"data": "data", "model": "model", "optim": "optimisation", "augment": "augmentation and regularisation",
              "distill": "distillation", "run": "run"}
    add_field_options(p, config_fields(), titles)
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    add_config_option(p)
    p.set_defaults(func=run_train)


def add_field_options(p: argparse.ArgumentParser, config_fields: list, titles: dict[str, str]) -> None:
    """One flag per dataclass field (:func:`xcit.config.option` metadata: help, group, choices, nargs), grouped under ``titles``.

    Flags default to ``argparse.SUPPRESS``: only the options given end up in the namespace.
    """
    import dataclasses

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_fields:
        meta = f.metadata
        group = groups.setdefault(meta["group"], p.add_argument_group(titles.get(meta["group"], meta["group"])))
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{meta['help']} [recipe default: {default if default is not None else 'auto'}]".replace("%", "%%")
        kind, is_list = field_kind(f.type)
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if f.name == "resume":
            group.add_argument(flag, nargs="?", const="auto", metavar="RUN", **kwargs)
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag, type=kind, nargs=meta.get("nargs", "+") if is_list else None, **kwargs)


def given_options(args: argparse.Namespace) -> dict:
    """The options set on the command line or in the --config file (nothing else is in ``args``)."""
    return {k: v for k, v in vars(args).items() if k not in _INTERNAL}


def _saved_run_config(resume: str, output: str | None) -> dict:
    from ..train.config import load_config_file

    target = Path(output) if resume == "auto" and output else Path(resume)
    run_dir = target if target.is_dir() else target.parent
    if (run_dir / "config.yaml").is_file():
        return load_config_file(run_dir / "config.yaml")
    return {}


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from ..train import NonFiniteLossError, resolve_config, train

    values = given_options(args)
    if values.get("resume"):
        # A resumed run keeps its saved options; only what is given again is compared (and reported).
        values = {**_saved_run_config(values["resume"], values.get("output")), **values}
    cfg = resolve_config(values)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        train(cfg)
    except NonFiniteLossError as err:
        print(f"xcit train: stopped: {err}", file=sys.stderr)
        return 1
    return 0
