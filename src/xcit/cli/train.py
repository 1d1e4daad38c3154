"""`xcit train`: every option of :class:`xcit.train.TrainConfig`, from the command line or a YAML file.

``xcit train`` alone trains the Fashion-MNIST preset; ``xcit train --data /imagenet`` the paper's
ImageNet recipe; ``torchrun --nproc_per_node=8 -m xcit train ...`` the same data-parallel.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import field_kind
from .config import add_config_option

_INTERNAL = {"func", "command", "config", "_parser", "print_config", "detect_command", "segment_command"}
# Option groups of the training commands, in the order --help shows them (the shared run options last).
TITLES = {"data": "data", "model": "model", "optim": "optimisation", "augment": "augmentation and regularisation",
          "distill": "distillation", "eval": "evaluation", "run": "run (the same options in every training command)"}


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config import PRESETS, config_fields

    p = sub.add_parser(
        "train", help="train or fine-tune an XCiT (Fashion-MNIST preset by default; ImageNet-style folders; torchrun)",
        description="Train an XCiT. The defaults shown ('recipe default') are the paper's ImageNet recipe; a preset "
                    f"chosen by the dataset ({', '.join(PRESETS)}) replaces some of them (--print-config shows the "
                    "result), a --config YAML file overrides the preset and the command line overrides both. "
                    "The resolved configuration is saved in the run directory.",
    )
    add_field_options(p, config_fields(), TITLES)
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    add_config_option(p)
    p.set_defaults(func=run_train)


def add_field_options(p: argparse.ArgumentParser, config_fields: list, titles: dict[str, str]) -> None:
    """One flag per dataclass field (:func:`xcit.config.option` metadata: help, group, choices, nargs, type), grouped under ``titles``
    (the shared run options last), and the old spellings of renamed options as hidden aliases.

    Flags default to ``argparse.SUPPRESS``: only the options given end up in the namespace.
    """
    import dataclasses

    from ..train.config import RENAMED_OPTIONS

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
        values = {**_saved_run_config(values["resume"], values.get("output")), **values}
    return values


def print_config(cfg) -> None:
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _saved_run_config(resume: str, output: str | None) -> dict:
    from ..train.config import load_config_file

    target = Path(output) if resume == "auto" and output else Path(resume)
    run_dir = target if target.is_dir() else target.parent
    if (run_dir / "config.yaml").is_file():
        return load_config_file(run_dir / "config.yaml")
    return {}


def run_train(args: argparse.Namespace) -> int:
    from ..train import resolve_config, train

    cfg = resolve_config(training_options(args))
    if args.print_config:
        print_config(cfg)
        return 0
    train(cfg)
    return 0
