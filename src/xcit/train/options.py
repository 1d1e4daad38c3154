"""The options every training command shares, declared once, and the machinery that resolves them.

Each task (``xcit train``, ``xcit dino``, ``xcit detect train``, ``xcit segment train``) keeps its own
options in one dataclass in its own package (``<task>/config.py``), built on two mixins declared here:

* :class:`RunOptions` - how a run runs (folder, resume, precision, devices, cadences, time budget, the
  applied learning rate): one name, one default and one meaning in every command;
* :class:`OptimOptions` - what every recipe has but sets to its own value (epochs, batch size, the base
  learning rate and its reference batch, weight decay and its rule, clipping, the evaluation cadence):
  one name and one meaning everywhere, the default the task's official recipe (:func:`recipe_default`).

Precedence, lowest first: the dataclass defaults (the task's official recipe) < the preset (chosen by
``preset``, or by the dataset when not given) < YAML files < the command line. :func:`merge_with_preset`
applies the first two to the values a user gave; the CLI feeds it the YAML files and the command line
together.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import coerce_fields, option

AMP_MODES = ("auto", "none", "bf16", "fp16")
CLIP_MODES = ("global", "per-param")
#: Weight-decay rules: ``recipe`` is the task's official one (classification: bias-norm, DINO: dino,
#: detection and segmentation: mmcv).
WD_RULES = ("recipe", "bias-norm", "dino", "mmcv")


def cadence(value: Any) -> str:
    """A run cadence as written in options: ``N`` (every N steps), ``Nep`` (every N epochs, N may be
    fractional) or ``0`` (never in between); returned in that canonical spelling."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        if text.endswith(("ep", "epoch", "epochs")):
            number = float(text.removesuffix("epochs").removesuffix("epoch").removesuffix("ep"))
            if not math.isfinite(number) or number < 0:
                raise ValueError
            return "0" if number == 0 else f"{number:g}ep"
        number = float(text)
        if not number.is_integer() or number < 0 or isinstance(value, bool):
            raise ValueError
        return str(int(number))
    except ValueError:
        raise ValueError(f"expected N (steps), Nep (epochs, e.g. 1ep or 0.5ep) or 0, got {value!r}") from None


def every(value: str, steps_per_epoch: int) -> int:
    """The step interval of a :func:`cadence` (0: never)."""
    value = cadence(value)
    if value.endswith("ep"):
        return max(1, round(float(value[:-2]) * steps_per_epoch))
    return int(value)


@dataclass
class RunOptions:
    """The options every training command shares: one name, one default and one meaning each."""

    output: str | None = option(None, "run folder (default runs/<task>-<data>-<model>-<time>); a folder holding "
                              "another run's files is refused unless --resume or --overwrite", "run")
    resume: str | None = option(None, "continue a run: its folder or last.pt (bare --resume: --output's)", "run")
    overwrite: bool = option(False, "replace another run's files in --output (they are deleted first)", "run")
    seed: int = option(0, "random seed (initial weights, data order and augmentation, dropout)", "run")
    amp: str = option("auto", "mixed precision: auto (bf16 on CPU and bf16-capable GPUs, else fp16), bf16, fp16 "
                    "(CUDA, with a gradient scaler), none", "run", AMP_MODES)
    device: str = option("auto", "cpu, cuda, cuda:N or auto", "run")
    threads: int | None = option(None, "torch CPU threads per process (default: cores / local processes)", "run")
    dist_backend: str | None = option(None, "torch.distributed backend (default nccl on GPU, gloo on CPU)", "run")
    sync_bn: bool = option(True, "synchronise BatchNorm statistics across processes", "run")
    workers: int = option(8, "data-loading worker processes per process (0: load in the training process)", "run")
    lr: float | None = option(None, "learning rate applied (the peak of the schedule), as given; unset: --lr-base x "
                            "global batch / --lr-base-size", "optim")
    time_budget_min: float | None = option(None, "fit the run into this many minutes: the speed is measured on the "
                                         "first steps and the run's length (and every schedule) is set to the steps "
                                         "that fit (0 or none: no budget)", "optim")
    log_every: int = option(20, "write step metrics (and a log line without a progress bar) every N steps", "run")
    ckpt_every: str = option("500", "also save last.pt every N steps or Nep epochs (it is always saved after an "
                           "evaluation and at the end; 0: only then)", "run", type=cadence)
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)", "run")
    progress: bool = option(True, "progress bar (only on a terminal, only on rank 0)", "run")
    plot: bool = option(True, "write curves.png at every evaluation and at the end", "run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class OptimOptions(RunOptions):
    """The recipe options every training command has under the same name and meaning; each task's default
    is its official recipe's (:func:`recipe_default`)."""

    epochs: float | None = option(100, "training epochs (may be fractional; --iters overrides)", "optim")
    iters: int | None = option(None, "training steps (overrides --epochs)", "optim")
    batch_size: int = option(64, "images per step per process (global batch = this x processes)", "optim")
    lr_base: float = option(5e-4, "base learning rate for a global batch of --lr-base-size images, scaled linearly "
                          "to the global batch when --lr is not given", "optim")
    lr_base_size: int = option(512, "the global batch --lr-base is given for", "optim")
    weight_decay: float = option(0.05, "AdamW weight decay", "optim")
    wd_rule: str = option("recipe", "parameters exempt from weight decay: recipe (the task's official rule), bias-norm "
                        "(biases, 1-d parameters and the model's no_weight_decay() names: DeiT / XCiT), dino (biases "
                        "and 1-d parameters), mmcv (names containing 'norm': the dense-task configs)", "optim",
                        WD_RULES)
    wd_exempt_per_channel: bool = option(False, "also exempt per-channel parameters (XCA temperatures, cls token) from "
                                       "weight decay (the official recipes decay them)", "optim")
    clip_grad: float | None = option(None, "clip gradient norms to this value (none: no clipping)", "optim")
    clip_grad_mode: str = option("global", "global: one norm over all parameters; per-param: each parameter "
                               "separately (DINO's)", "optim", CLIP_MODES)
    eval_every: str = option("1ep", "evaluate every N steps or Nep epochs, and at the end (0: only at the end); "
                           "the best evaluation is kept as best.pt", "run", type=cadence)


@dataclass
class ArchOptions:
    """The XCiT a classification or DINO run trains: a registered architecture and the options overriding its shape."""

    model: str = option("xcit_small_12_p16", "architecture name (see `xcit models`); the options below override its "
                      "shape", "model")
    patch_size: int | None = option(None, "override the patch size (2, 4, 8, 16)", "model")
    embed_dim: int | None = option(None, "override the embedding dimension", "model")
    depth: int | None = option(None, "override the number of XCA blocks", "model")
    num_heads: int | None = option(None, "override the number of heads", "model")
    tokens_norm: bool | None = option(None, "override class-attention tokens_norm", "model")


def recipe_default(name: str, default: Any) -> Any:
    """The shared option ``name`` (declared once in :class:`OptimOptions` or :class:`RunOptions`) with a task's
    own default: the same help, group and choices in every command."""
    base = OptimOptions.__dataclass_fields__[name]
    meta = {k: v for k, v in base.metadata.items() if k not in ("help", "group", "choices")}
    return option(default, base.metadata["help"], base.metadata["group"], base.metadata["choices"], **meta)


@dataclass
class PyramidOptions(OptimOptions):
    """The options detection and segmentation share: the backbone (an XCiT feeding a feature pyramid)."""

    model: str | None = option(None, "backbone architecture, e.g. xcit_small_12_p16 (or give --pretrained / a custom "
                             "shape)", "model")
    pretrained: str | None = option(None, "backbone weights: a classification or DINO checkpoint, or a name "
                                  "(hf-hub:timm/..., dino_xcit_small_12_p16, xcit_small_12_p16_224.fb_in1k)", "model")
    patch_size: int | None = option(None, "custom backbone: patch size", "model")
    embed_dim: int | None = option(None, "custom backbone: embedding dimension", "model")
    depth: int | None = option(None, "custom backbone: XCA blocks", "model")
    num_heads: int | None = option(None, "custom backbone: heads", "model")
    out_indices: list[int] | None = option(None, "XCA blocks feeding the pyramid (default 3 5 7 11 / 7 11 15 23)",
                                         "model", nargs=4)
    drop_path: float | None = option(None, "stochastic depth (default: the named model's dense-task rate, else 0)",
                                   "model")
    batch_size: int = recipe_default("batch_size", 2)
    lr_base_size: int = recipe_default("lr_base_size", 16)

    def arch(self) -> dict[str, int]:
        """The custom shape options given (patch size, width, depth, heads)."""
        return {k: getattr(self, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")
                if getattr(self, k) is not None}


def resolve_lr(cfg: OptimOptions, global_batch: int) -> tuple[float, str]:
    """The learning rate a run applies and how it was reached (for the log and ``config.yaml``)."""
    if cfg.lr is not None:
        return float(cfg.lr), "--lr as given"
    lr = cfg.lr_base * global_batch / cfg.lr_base_size
    return lr, f"--lr-base {cfg.lr_base:g} x global batch {global_batch} / --lr-base-size {cfg.lr_base_size}"


# Spellings of options before the one dialect, accepted for one release on the command line, in config files and
# in Python as the names they became.
RENAMED_OPTIONS = {"out": "output", "backbone": "model", "log_interval": "log_every", "eval_interval": "eval_every",
                   "checkpoint_interval": "ckpt_every", "time_limit_min": "time_budget_min",
                   "wd_exempt_temperature": "wd_exempt_per_channel"}
# Options that changed meaning: refused with what to write instead (never read silently with another meaning).
CHANGED_OPTIONS = {
    "lr_scaling": "--lr is now the rate applied as given; for a rate scaled with the global batch give --lr-base "
                  "(and --lr-base-size, the global batch it is for) and leave --lr unset",
}


def rename_options(values: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """``values`` with old option names (dashes or underscores) replaced by their new ones, with a warning."""
    known = set(known)
    renamed = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in CHANGED_OPTIONS and name not in known:
            raise ValueError(f"option {name!r} is gone: {CHANGED_OPTIONS[name]}")
        new = RENAMED_OPTIONS.get(name)
        if new is not None and name not in known and new in known:
            warnings.warn(f"option {name!r} is now {new!r}; the old name goes away in the next release",
                          FutureWarning, stacklevel=3)
            if new in values or new.replace("_", "-") in values:
                raise ValueError(f"expected {new!r} or its old name {name!r}, not both")
            name = new
        renamed[name] = value
    return renamed


# Options that may change when a run is resumed; all others come from the run's saved configuration.
# The training length may change too: a resumed run can be extended (its schedules then follow the new length).
RUNTIME_OPTIONS = ("resume", "output", "overwrite", "workers", "threads", "progress", "tensorboard", "plot",
                   "log_every", "ckpt_every", "device", "dist_backend", "epochs", "iters", "time_budget_min")
# Option values that may be written as the words none / null / '' (None): every optional path or name.
NONE_WORDS = ("", "none", "null")


def merge_with_preset(given: dict[str, Any], config_fields: list[dataclasses.Field], presets: dict[str, dict],
                      choose: Callable[[str | None], str], what: str) -> dict[str, Any]:
    """``given`` (dashes or underscores; old option names renamed, with a warning) over its preset
    (``given['preset']``, else the one ``choose(data)`` picks), each value coerced to its field's type
    (:func:`xcit.config.coerce`: ``"2"`` -> 2 for an integer, ``2.5`` refused).

    Unknown keys and presets, and values of the wrong type, raise ``ValueError`` naming the option. The
    words '', 'none' and 'null' become None for every option that may be unset (``X | None``, and no parser of
    its own). A training length
    the user gives (``epochs`` or ``iters``) replaces the recipe's, whichever of the two that was in.
    """
    known = [f.name for f in config_fields]
    given = rename_options(given, known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    preset = given.get("preset") or choose(given.get("data"))
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    merged = {**presets[preset], **given, "preset": preset}
    if "epochs" in given and "iters" not in given:
        merged["iters"] = None
    optional = {f.name for f in config_fields if "None" in str(f.type) and "type" not in f.metadata}
    for key in optional:
        if isinstance(merged.get(key), str) and merged[key].strip().lower() in NONE_WORDS:
            merged[key] = None
    if merged.get("time_budget_min") == 0:
        merged["time_budget_min"] = None
    return coerce_fields(merged, config_fields)


def resolve_options(options_type: type, given: dict[str, Any], presets: dict[str, dict],
                    choose: Callable[[str | None], str], what: str, validate: Callable[[Any], None],
                    complete: Callable[[Any], None] | None = None) -> Any:
    """``options_type`` from user values (:func:`merge_with_preset`), completed by ``complete`` (values derived from
    others, e.g. paths inside ``--data``) and validated: every task's ``resolve_config``."""
    cfg = options_type(**merge_with_preset(given, list(fields(options_type)), presets, choose, what=what))
    if complete is not None:
        complete(cfg)
    validate(cfg)
    return cfg


def dataset_preset(data: str | None) -> str:
    """The preset of a kind of data when none is named: ``fashion-mnist`` (also any IDX folder), ``digits``, else
    ``imagenet`` (class folders; a bad path is reported, clearly, when the dataset is built)."""
    from ..data.datasets import dataset_kind

    try:
        kind = dataset_kind(data or "fashion-mnist")
    except ValueError:
        return "imagenet"
    return {"fashion-mnist": "fashion-mnist", "idx": "fashion-mnist", "digits": "digits"}.get(kind, "imagenet")


def require(cond: bool, message: str) -> None:
    """``ValueError(message)`` unless ``cond``: the options' one way to refuse a value."""
    if not cond:
        raise ValueError(message)


def is_number(value: Any) -> bool:
    """A finite int or float (booleans are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_integers(cfg: Any, names: Iterable[str], low: int = 1) -> None:
    """Each option of ``names`` an integer >= ``low``."""
    for name in names:
        value = getattr(cfg, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"expected {name} to be an integer >= {low}, got {value!r}")


def require_between(cfg: Any, names: Iterable[str], low: float = 0.0, high: float = math.inf) -> None:
    """Each option of ``names`` a number in [``low``, ``high``]."""
    for name in names:
        value = getattr(cfg, name)
        span = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        require(is_number(value) and low <= value <= high, f"expected {name} {span}, got {value!r}")


def validate_run_options(cfg: OptimOptions) -> None:
    """Raise ``ValueError`` saying what was expected for a shared option that cannot work (every training
    command calls this; its own options are checked by its own ``validate``)."""
    require_integers(cfg, ("log_every", "batch_size", "lr_base_size"), 1)
    require_integers(cfg, ("workers", "seed"), 0)
    require_integers(cfg, [n for n in ("threads", "iters") if getattr(cfg, n) is not None], 1)
    require(cfg.amp in AMP_MODES, f"expected amp in {AMP_MODES}, got {cfg.amp!r}")
    require(isinstance(cfg.device, str) and (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")),
            f"expected device auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    require(not (cfg.overwrite and cfg.resume), "expected --resume or --overwrite, not both (resuming keeps the run's "
                                                "files)")
    for name in ("eval_every", "ckpt_every"):
        setattr(cfg, name, cadence(getattr(cfg, name)))
    require(cfg.lr is None or (is_number(cfg.lr) and cfg.lr > 0), f"expected lr > 0 (or unset), got {cfg.lr!r}")
    require(is_number(cfg.lr_base) and cfg.lr_base > 0, f"expected lr_base > 0, got {cfg.lr_base!r}")
    require(cfg.epochs is None or (is_number(cfg.epochs) and cfg.epochs > 0),
            f"expected epochs > 0, got {cfg.epochs!r}")
    require(cfg.epochs is not None or cfg.iters is not None, "expected --epochs or --iters (the training length)")
    require_between(cfg, ["weight_decay"])
    require(cfg.wd_rule in WD_RULES, f"expected wd_rule in {WD_RULES}, got {cfg.wd_rule!r}")
    require(cfg.clip_grad_mode in CLIP_MODES, f"expected clip_grad_mode in {CLIP_MODES}, got {cfg.clip_grad_mode!r}")
    require(cfg.clip_grad is None or (is_number(cfg.clip_grad) and cfg.clip_grad > 0),
            f"expected clip_grad > 0 or none, got {cfg.clip_grad!r}")
    require(cfg.time_budget_min is None or (is_number(cfg.time_budget_min) and cfg.time_budget_min > 0),
            f"expected time_budget_min > 0 (0 or none: no budget), got {cfg.time_budget_min!r}")


def validate_dense_options(cfg: PyramidOptions) -> None:
    """The checks detection and segmentation share: a backbone to build, and the shared options."""
    validate_run_options(cfg)
    require(cfg.model is not None or cfg.pretrained is not None or cfg.embed_dim is not None,
            "expected --model NAME, --pretrained CKPT or a custom shape (--patch-size/--embed-dim/--depth/--num-heads)")
    if cfg.model is not None:
        from ..models import resolve_name

        resolve_name(cfg.model)  # an unknown name: ValueError listing the known ones
    require_integers(cfg, ["warmup_iters"], 0)
    require_between(cfg, ("hflip", "warmup_ratio"), 0.0, 1.0)


def load_config_file(path: str | Path) -> dict:
    """The option mapping of a YAML file (a run's ``config.yaml``, or one written by hand)."""
    from ..config import read_yaml

    path = Path(path)
    data = read_yaml(path) or {}  # strict: not UTF-8, invalid YAML or a key given twice is a one-line error
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    data.pop("_derived", None)
    return data


def saved_run_options(resume: str, output: str | None) -> dict:
    """The options a run saved in its ``config.yaml`` (``resume``: its folder or ``last.pt``; ``auto``: ``output``),
    or nothing when there is none: a resumed run takes every option not given again from there."""
    target = Path(output) if resume == "auto" and output else Path(resume)
    run_dir = target if target.is_dir() else target.parent
    if (run_dir / "config.yaml").is_file():
        return load_config_file(run_dir / "config.yaml")
    return {}
