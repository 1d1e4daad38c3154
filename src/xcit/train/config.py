"""The training configuration: one dataclass, its presets, and its validation.

Precedence, lowest first: the dataclass defaults (the official ImageNet recipe of the paper) <
the preset (chosen by ``preset``, or by the dataset when not given) < a YAML file < the command
line. :func:`resolve_config` applies the first two to the values a user gave; the CLI feeds it
the YAML file and the command line together.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import coerce_fields, option

AMP_MODES = ("auto", "none", "bf16", "fp16")
CLIP_MODES = ("global", "per-param")
WD_RULES = ("mmcv", "bias-norm")
DISTILLATION = ("none", "soft", "hard")
SCHEDULES = ("cosine", "constant")
CROPS = ("random-resized", "pad", "none")
SCHED_STEPS = ("epoch", "step")
EVAL_WEIGHTS = ("raw", "ema")


@dataclass
class RunOptions:
    """The options every training command shares (``xcit train``, ``dino``, ``detect train``, ``segment train``):
    one name, one default and one meaning each, declared once here."""

    output: str | None = option(None, "run folder (default runs/<task>-<data>-<model>-<time>); a folder holding another "
                              "run's files is refused unless --resume or --overwrite", "run")
    resume: str | None = option(None, "continue a run: its folder or last.pt (bare --resume: --output's)", "run")
    overwrite: bool = option(False, "replace another run's files in --output (they are deleted first)", "run")
    seed: int = option(0, "random seed", "run")
    amp: str = option("auto", "mixed precision: auto (bf16 on CPU and bf16-capable GPUs, else fp16), bf16, fp16 "
                    "(CUDA, with a gradient scaler), none", "run", AMP_MODES)
    device: str = option("auto", "cpu, cuda, cuda:N or auto", "run")
    threads: int | None = option(None, "torch CPU threads per process (default: cores / local processes)", "run")
    dist_backend: str | None = option(None, "torch.distributed backend (default nccl on GPU, gloo on CPU)", "run")
    sync_bn: bool = option(True, "synchronise BatchNorm statistics across processes", "run")
    workers: int = option(8, "data-loading worker processes per process (0: load in the training process)", "run")
    log_every: int = option(20, "write step metrics (and a log line without a progress bar) every N steps", "run")
    ckpt_every: int = option(500, "also save last.pt every N steps (0: only at epoch ends and at the end)", "run")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)", "run")
    progress: bool = option(True, "progress bars (only on a terminal, only on rank 0)", "run")
    plot: bool = option(True, "write curves.png at the end", "run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PyramidOptions(RunOptions):
    """The options detection and segmentation share: the backbone (an XCiT feeding a feature pyramid) and how
    the optimiser treats it."""

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

    batch_size: int = option(2, "images per step per process (global batch = this x processes; the official "
                           "recipes: 2 x 8 GPUs)", "optim")
    wd_rule: str = option("mmcv", "no-decay rule: mmcv (official: only names containing 'norm') or bias-norm (biases, "
                        "norms and 1-d parameters, the classification rule)", "optim", WD_RULES)
    wd_exempt_per_channel: bool = option(False, "with --wd-rule bias-norm: also exempt per-channel parameters (XCA "
                                       "temperatures)", "optim")
    clip_grad: float | None = option(None, "clip gradient norms to this value (default: no clipping)", "optim")
    clip_grad_mode: str = option("global", "global: one norm over all parameters; per-param: each separately", "optim",
                               CLIP_MODES)
    time_budget_min: float | None = option(None, "stop after this many minutes; the learning-rate schedule then follows "
                                         "the elapsed time", "optim")

    def arch(self) -> dict[str, int]:
        """The custom shape options given (patch size, width, depth, heads)."""
        return {k: getattr(self, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")
                if getattr(self, k) is not None}


# Spellings of the detection / segmentation commands (and of `xcit train` before the one dialect), accepted
# for one release on the command line, in config files and in Python as the names they became.
RENAMED_OPTIONS = {"out": "output", "backbone": "model", "log_interval": "log_every", "eval_interval": "eval_every",
                   "checkpoint_interval": "ckpt_every", "time_limit_min": "time_budget_min",
                   "wd_exempt_temperature": "wd_exempt_per_channel"}


def rename_options(values: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """``values`` with old option names (dashes or underscores) replaced by their new ones, with a warning."""
    known = set(known)
    renamed = {}
    for key, value in values.items():
        name = key.replace("-", "_")
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
RUNTIME_OPTIONS = ("resume", "output", "overwrite", "workers", "threads", "progress", "tensorboard", "plot",
                   "log_every", "ckpt_every", "device", "dist_backend")


@dataclass
class TrainConfig(RunOptions):
    """Every option of ``xcit train``; the defaults are the paper's ImageNet recipe (REFERENCE 3)."""

    # --- data
    data: str = option("fashion-mnist", "dataset: fashion-mnist, digits, a folder of IDX files, or a folder with "
                     "train/ and val/ class folders (ImageNet layout)", "data")
    train_split: str = option("train", "training split (sub-folder for class folders)", "data")
    val_split: str = option("val", "evaluation split (Fashion-MNIST: its 10k test images)", "data")
    img_size: int | None = option(None, "training/eval resolution (default: 224 for folders, native otherwise)", "data")
    in_chans: int | None = option(None, "image channels (default: the dataset's; 3 for folders)", "data")
    mean: list[float] | None = option(None, "normalisation mean (default: the dataset's)", "data", nargs="+")
    std: list[float] | None = option(None, "normalisation std (default: the dataset's)", "data", nargs="+")
    crop_pct: float = option(1.0, "evaluation crop ratio: resize to size / crop_pct, centre crop (paper: 1.0)", "data")
    interpolation: str = option("bicubic", "resize interpolation", "data", ("bicubic", "bilinear", "nearest"))

    # --- model
    model: str = option("xcit_small_12_p16", "architecture name (see `xcit models`)", "model")
    patch_size: int | None = option(None, "override the architecture's patch size (2, 4, 8, 16)", "model")
    embed_dim: int | None = option(None, "override the embedding dimension", "model")
    depth: int | None = option(None, "override the number of XCA blocks", "model")
    num_heads: int | None = option(None, "override the number of heads", "model")
    mlp_ratio: float | None = option(None, "override the FFN expansion ratio (4)", "model")
    tokens_norm: bool | None = option(None, "override class-attention tokens_norm", "model")
    drop_path: float | None = option(None, "stochastic depth (default: the model's preset, e.g. 0.05 for small_12)", "model")
    dropout: float = option(0.0, "dropout rate", "model")
    finetune: str | None = option(None, "start from these weights (checkpoint file or a model name for the release "
                                "weights); a different class count gets a new head, a different resolution is "
                                "fine (Fourier positions), 3 <-> 1 channel stems are converted", "model")
    grad_checkpointing: bool = option(False, "recompute blocks in backward to save memory", "model")

    # --- optimisation
    epochs: int = option(400, "training epochs", "optim")
    batch_size: int = option(128, "batch size per process (global batch = this x processes)", "optim")
    eval_batch_size: int | None = option(None, "evaluation batch size per process (default 2 x batch size)", "optim")
    lr: float = option(5e-4, "peak learning rate for a global batch of 512 (scaled linearly, see --lr-scaling)", "optim")
    lr_scaling: bool = option(True, "scale lr by global batch / 512 (off: lr is used as given)", "optim")
    min_lr: float = option(1e-5, "final learning rate of the cosine schedule", "optim")
    warmup_lr: float = option(1e-6, "learning rate at the start of warmup", "optim")
    warmup_epochs: float = option(5.0, "linear warmup length in epochs (may be fractional)", "optim")
    sched: str = option("cosine", "learning-rate schedule after warmup", "optim", SCHEDULES)
    sched_step: str = option("epoch", "when the schedule moves: epoch (the official code: timm's scheduler stepped after "
                           "each epoch, so the first two epochs run at warmup_lr) or step (every iteration)", "optim",
                           SCHED_STEPS)
    weight_decay: float = option(0.05, "AdamW weight decay", "optim")
    wd_exempt_per_channel: bool = option(False, "exempt per-channel parameters (XCA temperatures) from weight decay (the official code decays "
                                       "them: XCA's own no_weight_decay() is never read; off reproduces it)", "optim")
    opt_eps: float = option(1e-8, "AdamW epsilon", "optim")
    clip_grad: float | None = option(None, "clip the gradient norm to this value (default: no clipping)", "optim")
    layer_decay: float | None = option(None, "layer-wise lr decay factor (e.g. 0.75 for fine-tuning)", "optim")

    # --- augmentation and regularisation
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "timm RandAugment string ('none' to disable)", "augment")
    train_crop: str = option("random-resized", "training crop: random-resized, pad (pad and random crop), none",
                           "augment", CROPS)
    crop_scale_min: float = option(0.08, "smallest area fraction of random-resized crops", "augment")
    crop_padding: int = option(4, "padding of the 'pad' crop", "augment")
    hflip: float = option(0.5, "horizontal flip probability", "augment")
    reprob: float = option(0.25, "random erasing probability", "augment")
    mixup: float = option(0.8, "mixup alpha (0: off)", "augment")
    cutmix: float = option(1.0, "cutmix alpha (0: off)", "augment")
    mixup_prob: float = option(1.0, "probability of applying mixup or cutmix to a batch", "augment")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on", "augment")
    smoothing: float = option(0.1, "label smoothing", "augment")
    repeated_aug: int = option(3, "repeated augmentation: copies of each image per epoch (1: off)", "augment")
    ema: bool = option(True, "keep an exponential moving average of the weights and evaluate it", "augment")
    ema_decay: float = option(0.99996, "EMA decay per step", "augment")
    ema_warmup: bool = option(False, "ramp the EMA decay up over the first steps (timm ModelEmaV3 warmup)", "augment")
    eval_weights: str = option("raw", "weights evaluated, reported and saved as model.pth, chosen before training: raw "
                             "(the official code) or ema (needs --ema); the other is only logged", "augment",
                             EVAL_WEIGHTS)

    # --- distillation (DeiT-style through the single head, no distillation token)
    teacher: str | None = option(None, "teacher checkpoint for distillation", "distill")
    teacher_model: str | None = option(None, "teacher architecture: an XCiT name or a timm model name (default: read "
                                     "the XCiT architecture from the checkpoint)", "distill")
    distillation: str = option("hard", "distillation type when a teacher is given", "distill", DISTILLATION)
    distill_alpha: float = option(0.5, "weight of the distillation loss", "distill")
    distill_tau: float = option(1.0, "soft distillation temperature", "distill")

    # --- run (the options shared by every training command are in RunOptions)
    eval_every: int = option(1, "evaluate every N epochs (and always after the last)", "run")
    preset: str | None = option(None, "option preset: imagenet, fashion-mnist, digits (default: by dataset)", "run")


# Presets: option values that replace the defaults (the ImageNet recipe) for a kind of data.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {},
    # Fashion-MNIST on a 2-core CPU in under 15 minutes (docs/training.md has the measurements): a
    # 1.3M-parameter XCiT with 8x8 patches (its 3-conv stem gives a 4x4 token grid), small batches,
    # label smoothing and flips only, 8 epochs. Tuned choices kept from before the fidelity defaults
    # (docs/fidelity.md): the schedule moves every step and the XCA temperatures are not decayed.
    "fashion-mnist": dict(
        model="xcit_nano_12_p16", patch_size=8, embed_dim=128, depth=4, num_heads=4, tokens_norm=True,
        drop_path=0.0, epochs=8, batch_size=64, eval_batch_size=1000, lr=2.4e-2, min_lr=1e-5, warmup_lr=1e-6,
        warmup_epochs=0.5, auto_augment=None, train_crop="none", hflip=0.5, reprob=0.0, mixup=0.0, cutmix=0.0,
        smoothing=0.1, repeated_aug=1, ema=False, amp="bf16", workers=0, log_every=50,
        sched_step="step", wd_exempt_per_channel=True,
    ),
    # Seconds-long runs on scikit-learn's 8x8 digits, for tests and smoke checks.
    "digits": dict(
        model="xcit_nano_12_p16", patch_size=2, embed_dim=32, depth=2, num_heads=2, tokens_norm=True,
        drop_path=0.0, epochs=3, batch_size=64, eval_batch_size=512, lr=4e-3, lr_scaling=False, warmup_epochs=0.5,
        auto_augment=None, train_crop="none", hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
        repeated_aug=1, ema=False, amp="none", workers=0, log_every=5, sched_step="step", wd_exempt_per_channel=True,
    ),
}


def config_fields() -> list[dataclasses.Field]:
    return list(fields(TrainConfig))


def default_preset(data: str) -> str:
    """The preset a dataset gets when none is named."""
    from ..data.datasets import dataset_kind

    try:
        kind = dataset_kind(data)
    except ValueError:
        return "imagenet"  # the data error is reported, clearly, when the dataset is built
    return {"fashion-mnist": "fashion-mnist", "idx": "fashion-mnist", "digits": "digits"}.get(kind, "imagenet")


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> TrainConfig:
    """A :class:`TrainConfig` from user values: defaults < preset < ``values`` < ``kwargs``.

    Unknown keys raise ``ValueError`` naming the known ones; the result is validated.
    """
    merged = merge_with_preset({**(values or {}), **kwargs}, config_fields(), PRESETS,
                               TrainConfig.data, ("auto_augment", "teacher", "teacher_model", "finetune", "output",
                                                  "resume"), what="training")
    cfg = TrainConfig(**merged)
    validate(cfg)
    return cfg


def merge_with_preset(given: dict[str, Any], config_fields: list[dataclasses.Field], presets: dict[str, dict],
                      default_data: str, none_keys: tuple[str, ...], what: str,
                      choose: Callable[[str], str] | None = None) -> dict[str, Any]:
    """``given`` (dashes or underscores; old option names renamed, with a warning) over its preset
    (``given['preset']``, else the one ``choose`` -- by default :func:`default_preset` -- picks for the data),
    each value coerced to its field's type (:func:`xcit.config.coerce`: ``"2"`` -> 2 for an integer, ``2.5`` refused).

    Unknown keys and presets, and values of the wrong type, raise ``ValueError`` naming the option; the
    strings '', 'none' and 'null' of ``none_keys`` become None (as YAML files and command lines write them).
    """
    known = [f.name for f in config_fields]
    given = rename_options(given, known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    preset = given.get("preset") or (choose or default_preset)(str(given.get("data", default_data)))
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    merged = {**presets[preset], **given, "preset": preset}
    for key in none_keys:
        if isinstance(merged.get(key), str) and merged[key].strip().lower() in ("", "none", "null"):
            merged[key] = None
    return coerce_fields(merged, config_fields)


def validate_run_options(cfg: RunOptions) -> None:
    """Raise ``ValueError`` for a shared run option that cannot work (every training command calls this)."""
    def count(name: str, low: int) -> None:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"expected {name} to be an integer >= {low}, got {value!r}")

    for name, low in (("log_every", 1), ("ckpt_every", 0), ("workers", 0), ("seed", 0)):
        count(name, low)
    if cfg.threads is not None:
        count("threads", 1)
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"expected amp in {AMP_MODES}, got {cfg.amp!r}")
    if not isinstance(cfg.device, str) or not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ValueError(f"expected device auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.overwrite and cfg.resume:
        raise ValueError("expected --resume or --overwrite, not both (resuming keeps the run's files)")


def validate_dense_options(cfg: Any) -> None:
    """The checks detection and segmentation training share: a backbone to build, positive counts and rates,
    and the optional budget and clipping values."""
    validate_run_options(cfg)
    if cfg.model is None and cfg.pretrained is None and cfg.embed_dim is None:
        raise ValueError("expected --model NAME, --pretrained CKPT or a custom shape (--patch-size/--embed-dim/--depth/"
                         "--num-heads)")
    if cfg.model is not None:
        from ..models import resolve_name

        resolve_name(cfg.model)  # an unknown name: ValueError listing the known ones
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"expected batch_size to be an integer >= 1, got {cfg.batch_size!r}")
    if not isinstance(cfg.lr, (int, float)) or not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ValueError(f"expected lr > 0, got {cfg.lr!r}")
    for name in ("eval_every", "warmup_iters", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"expected {name} >= 0, got {getattr(cfg, name)}")
    for name in ("hflip", "warmup_ratio"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"expected {name} in [0, 1], got {getattr(cfg, name)}")
    if cfg.time_budget_min is not None and cfg.time_budget_min <= 0:
        raise ValueError(f"expected time_budget_min > 0 (0 or none: no budget), got {cfg.time_budget_min}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise ValueError(f"expected clip_grad > 0 or none, got {cfg.clip_grad}")


def validate(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for any option value that cannot work, before anything runs."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ValueError(message)

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(finite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, got {cfg.lr}")
    need(finite(cfg.min_lr) and cfg.min_lr >= 0, f"min_lr must be >= 0, got {cfg.min_lr}")
    need(finite(cfg.warmup_lr) and cfg.warmup_lr >= 0, f"warmup_lr must be >= 0, got {cfg.warmup_lr}")
    need(finite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    need(isinstance(cfg.epochs, int) and cfg.epochs >= 1, f"epochs must be a positive integer, got {cfg.epochs}")
    need(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, f"batch_size must be a positive integer, got {cfg.batch_size}")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.clip_grad is None or (finite(cfg.clip_grad) and cfg.clip_grad > 0), f"clip_grad must be > 0, got {cfg.clip_grad}")
    need(cfg.layer_decay is None or 0 < cfg.layer_decay <= 1, f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    for name in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "smoothing", "dropout", "distill_alpha"):
        value = getattr(cfg, name)
        need(finite(value) and 0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
    need(cfg.drop_path is None or 0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1), got {cfg.drop_path}")
    need(cfg.smoothing < 1, f"smoothing must be < 1, got {cfg.smoothing}")
    need(cfg.mixup >= 0 and cfg.cutmix >= 0, f"mixup and cutmix alphas must be >= 0, got {cfg.mixup}, {cfg.cutmix}")
    need(0 < cfg.ema_decay < 1, f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    need(cfg.repeated_aug >= 1, f"repeated_aug must be >= 1 (1 = off), got {cfg.repeated_aug}")
    need(cfg.img_size is None or cfg.img_size >= 1, f"img_size must be >= 1, got {cfg.img_size}")
    need(cfg.in_chans is None or cfg.in_chans >= 1, f"in_chans must be >= 1, got {cfg.in_chans}")
    need(0 < cfg.crop_pct <= 1, f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    need(0 < cfg.crop_scale_min <= 1, f"crop_scale_min must be in (0, 1], got {cfg.crop_scale_min}")
    need(cfg.crop_padding >= 0, f"crop_padding must be >= 0, got {cfg.crop_padding}")
    need(cfg.distill_tau > 0, f"distill_tau must be > 0, got {cfg.distill_tau}")
    validate_run_options(cfg)
    need(isinstance(cfg.eval_every, int) and cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    need(cfg.distillation in DISTILLATION, f"distillation must be one of {DISTILLATION}, got {cfg.distillation!r}")
    need(cfg.sched in SCHEDULES, f"sched must be one of {SCHEDULES}, got {cfg.sched!r}")
    need(cfg.sched_step in SCHED_STEPS, f"sched_step must be one of {SCHED_STEPS}, got {cfg.sched_step!r}")
    need(cfg.eval_weights in EVAL_WEIGHTS, f"eval_weights must be one of {EVAL_WEIGHTS}, got {cfg.eval_weights!r}")
    need(cfg.eval_weights != "ema" or cfg.ema, "eval_weights ema needs --ema (an EMA of the weights to report)")
    need(cfg.train_crop in CROPS, f"train_crop must be one of {CROPS}, got {cfg.train_crop!r}")
    for name in ("mean", "std"):
        value = getattr(cfg, name)
        need(value is None or (len(value) >= 1 and all(finite(v) for v in value)), f"{name} must be numbers, got {value}")
    need(cfg.std is None or all(v > 0 for v in cfg.std), f"std must be positive, got {cfg.std}")
    from ..models import resolve_name

    resolve_name(cfg.model)  # unknown model: ValueError listing the known ones


def save_config(cfg: TrainConfig, path: Path, derived: dict | None = None) -> None:
    """Write the resolved configuration (and derived values, e.g. the actual lr) as YAML."""
    data = cfg.to_dict()
    if derived:
        data = {**data, "_derived": derived}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def load_config_file(path: str | Path) -> dict:
    """The option mapping of a YAML file (as written by :func:`save_config`, or by hand)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    data.pop("_derived", None)
    return data
