"""``xcit train`` options: one dataclass (the paper's ImageNet recipe as defaults), its presets and validation.

Precedence, lowest first: the defaults < the preset (chosen by ``preset``, else by the dataset) < YAML
files < the command line (:func:`xcit.train.options.merge_with_preset`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import option
from ..train.options import (ArchOptions, OptimOptions, dataset_preset, is_number, recipe_default, require,
                             require_between, require_integers, resolve_options, validate_run_options)

DISTILLATION = ("none", "soft", "hard")
SCHEDULES = ("cosine", "constant")
CROPS = ("random-resized", "pad", "none")
SCHED_STEPS = ("epoch", "step")
EVAL_WEIGHTS = ("raw", "ema")


@dataclass
class TrainConfig(OptimOptions, ArchOptions):
    """Every option of ``xcit train``; the defaults are the paper's ImageNet recipe (REFERENCE 3): lr 5e-4 per 512
    images (``--lr-base``, ``--lr-base-size``), so 1e-3 at the official global batch of 1024."""

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
    mlp_ratio: float | None = option(None, "override the FFN expansion ratio (4)", "model")
    drop_path: float | None = option(None, "stochastic depth (default: the model's preset, e.g. 0.05 for small_12)", "model")
    dropout: float = option(0.0, "dropout rate", "model")
    finetune: str | None = option(None, "start from these weights (checkpoint file or a model name for the release "
                                "weights); a different class count gets a new head, a different resolution is "
                                "fine (Fourier positions), 3 <-> 1 channel stems are converted", "model")
    grad_checkpointing: bool = option(False, "recompute blocks in backward to save memory", "model")

    # --- optimisation
    epochs: float | None = recipe_default("epochs", 400)
    batch_size: int = recipe_default("batch_size", 128)
    eval_batch_size: int | None = option(None, "evaluation batch size per process (default 2 x batch size)", "optim")
    min_lr: float = option(1e-5, "final learning rate of the cosine schedule", "optim")
    warmup_lr: float = option(1e-6, "learning rate at the start of warmup", "optim")
    warmup_epochs: float = option(5.0, "linear warmup length in epochs (may be fractional)", "optim")
    sched: str = option("cosine", "learning-rate schedule after warmup", "optim", SCHEDULES)
    sched_step: str = option("epoch", "when the schedule moves: epoch (the official code: timm's scheduler stepped after "
                           "each epoch, so the first two epochs run at warmup_lr) or step (every iteration)", "optim",
                           SCHED_STEPS)
    opt_eps: float = option(1e-8, "AdamW epsilon", "optim")
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
    preset: str | None = option(None, "option preset: imagenet, fashion-mnist, digits (default: by dataset)", "run")


OPTIONS = TrainConfig  # the options dataclass of this task (read by the command line)

# Presets: option values that replace the defaults (the ImageNet recipe) for a kind of data.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {},
    # Fashion-MNIST on a 2-core CPU in under 15 minutes (docs/training.md has the measurements): a
    # 1.3M-parameter XCiT with 8x8 patches (its 3-conv stem gives a 4x4 token grid), small batches,
    # label smoothing and flips only, 8 epochs. Tuned choices kept from before the fidelity defaults
    # (docs/fidelity.md): the schedule moves every step and the XCA temperatures are not decayed.
    "fashion-mnist": dict(
        model="xcit_nano_12_p16", patch_size=8, embed_dim=128, depth=4, num_heads=4, tokens_norm=True,
        drop_path=0.0, epochs=8, batch_size=64, eval_batch_size=1000, lr_base=2.4e-2, min_lr=1e-5, warmup_lr=1e-6,
        warmup_epochs=0.5, auto_augment=None, train_crop="none", hflip=0.5, reprob=0.0, mixup=0.0, cutmix=0.0,
        smoothing=0.1, repeated_aug=1, ema=False, amp="bf16", workers=0, log_every=50,
        sched_step="step", wd_exempt_per_channel=True,
    ),
    # Seconds-long runs on scikit-learn's 8x8 digits, for tests and smoke checks.
    "digits": dict(
        model="xcit_nano_12_p16", patch_size=2, embed_dim=32, depth=2, num_heads=2, tokens_norm=True,
        drop_path=0.0, epochs=3, batch_size=64, eval_batch_size=512, lr=4e-3, warmup_epochs=0.5,
        auto_augment=None, train_crop="none", hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
        repeated_aug=1, ema=False, amp="none", workers=0, log_every=5, sched_step="step", wd_exempt_per_channel=True,
    ),
}


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> TrainConfig:
    """A :class:`TrainConfig` from user values: defaults < preset < ``values`` < ``kwargs``, validated.

    Unknown keys raise ``ValueError`` naming the known ones.
    """
    return resolve_options(TrainConfig, {**(values or {}), **kwargs}, PRESETS, dataset_preset, "training", validate)


def validate(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` saying what was expected for any option value that cannot work, before anything runs."""
    validate_run_options(cfg)
    require_between(cfg, ("min_lr", "warmup_lr", "warmup_epochs", "mixup", "cutmix", "crop_padding"))
    require_between(cfg, ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "dropout", "distill_alpha"), 0.0, 1.0)
    require_integers(cfg, [n for n in ("eval_batch_size", "img_size", "in_chans") if getattr(cfg, n) is not None])
    require_integers(cfg, ["repeated_aug"])
    for name, value in (("layer_decay", cfg.layer_decay), ("crop_pct", cfg.crop_pct),
                        ("crop_scale_min", cfg.crop_scale_min)):
        require(value is None or (is_number(value) and 0 < value <= 1), f"expected {name} in (0, 1], got {value}")
    for name, value in (("drop_path", cfg.drop_path), ("smoothing", cfg.smoothing), ("ema_decay", cfg.ema_decay)):
        require(value is None or (is_number(value) and 0 <= value < 1), f"expected {name} in [0, 1), got {value}")
    require(cfg.ema_decay > 0, f"expected ema_decay in (0, 1), got {cfg.ema_decay}")
    require(is_number(cfg.distill_tau) and cfg.distill_tau > 0, f"expected distill_tau > 0, got {cfg.distill_tau}")
    for name, value, choices in (("distillation", cfg.distillation, DISTILLATION), ("sched", cfg.sched, SCHEDULES),
                                 ("sched_step", cfg.sched_step, SCHED_STEPS), ("train_crop", cfg.train_crop, CROPS),
                                 ("eval_weights", cfg.eval_weights, EVAL_WEIGHTS)):
        require(value in choices, f"expected {name} in {choices}, got {value!r}")
    require(cfg.eval_weights != "ema" or cfg.ema, "eval_weights ema needs --ema (an EMA of the weights to report)")
    for name in ("mean", "std"):
        value = getattr(cfg, name)
        require(value is None or (len(value) >= 1 and all(is_number(v) for v in value)),
                f"expected {name} to be numbers, got {value}")
    require(cfg.std is None or all(v > 0 for v in cfg.std), f"expected std > 0, got {cfg.std}")
    from ..models import resolve_name

    resolve_name(cfg.model)  # unknown model: ValueError listing the known ones
