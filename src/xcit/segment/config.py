"""``xcit segment train`` options: one dataclass (the paper's ADE20k recipe as defaults), presets, validation,
and the test-time settings stored in checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import option
from ..train.options import (
    PyramidOptions,
    recipe_default,
    require,
    require_between,
    resolve_options,
    validate_dense_options,
)

HEADS = ("fpn", "upernet")
EVAL_MODES = ("whole", "slide")


def int_or_none(text: str) -> int | None:
    """An integer, or None for the word 'none' (``--scale none``: keep the images' own size)."""
    if str(text).strip().lower() == "none":
        return None
    return int(text)


@dataclass
class EvalSettings:
    """How images are predicted at test time (stored in checkpoints, reused by eval / predict)."""

    mode: str = "whole"  # or "slide"
    scale: list[int] | None = field(default_factory=lambda: [2048, 512])  # keep-ratio test rescale; None: as is
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # slide window
    stride: list[int] = field(default_factory=lambda: [341, 341])  # slide step
    flip: bool = False


@dataclass
class SegmentConfig(PyramidOptions):
    """Every option of ``xcit segment train``. Defaults are the paper's ADE20k recipe (REFERENCE 4): AdamW
    lr 6e-5 for a global batch of 16 (``--lr-base``, ``--lr-base-size``), wd 0.01 (mmcv rule), poly with warm-up,
    the head's schedule (UperNet 160k iterations, Semantic FPN 80k) evaluated every tenth of it, 512x512 crops,
    2 images per process (16 over the official 8 GPUs)."""

    # --- data
    data: str | None = option(None, "dataset root (ROOT/images/SPLIT, ROOT/annotations/SPLIT, optional "
                            "ROOT/dataset.yaml)", "data")
    train_split: str = option("training", "training split", "data")
    val_split: str = option("validation", "evaluation split", "data")
    num_classes: int | None = option(None, "classes (default: those in ROOT/dataset.yaml)", "data")
    ignore_index: int | None = option(None, "mask value to ignore (default: dataset.yaml's, else 255)", "data")
    reduce_zero_label: bool | None = option(None, "0 is 'other' (ignored) and k is class k-1, as in ADE20k (default: "
                                          "dataset.yaml's, else off)", "data")
    # --- model
    head: str = option("upernet", "decode head: Semantic FPN or UperNet", "model", HEADS)
    channels: int | None = option(None, "head width (default: UperNet 512, Semantic FPN 128)", "model")
    fpn_channels: int | None = option(None, "Semantic FPN neck width (default: the backbone's, as the official "
                                    "configs: 384 for small)", "model")
    norm: str = option("bn", "head norm: BatchNorm (synchronised when distributed) or GroupNorm", "model", ("bn", "gn"))
    aux: bool | None = option(None, "auxiliary FCN head (default: on for UperNet)", "model")
    aux_weight: float = option(0.4, "auxiliary loss weight", "model")
    grad_checkpointing: bool = option(False, "recompute blocks in backward to save memory", "model")
    # --- optimisation
    iters: int | None = recipe_default("iters", None)  # None: the head's official schedule (HEAD_ITERS)
    epochs: float | None = recipe_default("epochs", None)
    lr_base: float = recipe_default("lr_base", 6e-5)
    weight_decay: float = recipe_default("weight_decay", 0.01)
    warmup_iters: int = option(1500, "linear warm-up iterations", "optim")
    warmup_ratio: float = option(1e-6, "warm-up starts at this fraction of the rate", "optim")
    power: float = option(1.0, "poly power", "optim")
    min_lr: float = option(0.0, "final learning rate", "optim")
    # --- augmentation
    crop_size: list[int] = option([512, 512], "random crop H [W]", "augment")
    scale: list[int] | None = option([2048, 512], "base rescale LONG SHORT, or 'none' to keep the images' own size",
                                   "augment", type=int_or_none)
    ratio_range: list[float] = option([0.5, 2.0], "random rescale range", "augment", nargs=2)
    cat_max_ratio: float = option(0.75, "re-draw crops where one class exceeds this share", "augment")
    photometric: bool = option(True, "photometric jitter", "augment")
    hflip: float = option(0.5, "horizontal flip probability", "augment")
    # --- evaluation
    eval_every: str | None = recipe_default("eval_every", None)  # None: a tenth of the run, as the official configs
    eval_mode: str = option("whole", "test-time inference: whole image or sliding window", "eval", EVAL_MODES)
    eval_scale: list[int] | None = option(None, "keep-ratio rescale before inference: LONG SHORT, or 'none' for the "
                                        "native size (default: as --scale)", "eval", type=int_or_none)
    eval_crop_size: list[int] | None = option(None, "slide window H [W] (default: --crop-size)", "eval")
    eval_stride: list[int] | None = option(None, "slide step H [W] (default: 2/3 of the window)", "eval")
    eval_flip: bool = option(False, "add the mirrored prediction", "eval")
    # --- run (the options shared by every training command are in RunOptions)
    preset: str | None = option(None, "option preset: ade20k (the paper's recipe, the default)", "run")

    @property
    def eval(self) -> EvalSettings:
        """The test-time settings these options give (the defaults follow the training crops)."""
        crop = list(self.eval_crop_size or self.crop_size)
        # eval_scale None: as --scale; [] ('none' given): the native size
        return EvalSettings(mode=self.eval_mode, scale=self.scale if self.eval_scale is None else self.eval_scale or None,
                            crop_size=crop, stride=list(self.eval_stride or [max(1, 2 * s // 3) for s in crop]),
                            flip=self.eval_flip)


OPTIONS = SegmentConfig  # the options dataclass of this task (read by the command line)
#: The official schedules (xcit ``semantic_segmentation/configs``): Semantic FPN 80k iterations, UperNet 160k, each
#: evaluated every tenth of its run (mmseg ``schedule_80k.py`` / ``schedule_160k.py``).
HEAD_ITERS = {"fpn": 80000, "upernet": 160000}
#: Dense-task drop path where the Semantic FPN configs differ from the model's (``sem_fpn_xcit_medium_24_*``: 0.2;
#: UperNet and detection: 0.15).
FPN_DROP_PATH = {"medium_24": 0.2}
PRESETS: dict[str, dict[str, Any]] = {"ade20k": {}}


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> SegmentConfig:
    """A :class:`SegmentConfig` from user values: defaults < preset < ``values`` < ``kwargs`` (validated)."""
    given = {k.replace("-", "_"): v for k, v in {**(values or {}), **kwargs}.items()}
    if "flip" in given and "hflip" not in given:  # the training flip's name before the one dialect
        given["hflip"] = given.pop("flip")
    return resolve_options(SegmentConfig, given, PRESETS, lambda data: "ade20k", "segmentation", validate,
                           complete=_complete)


def _complete(cfg: SegmentConfig) -> None:
    """The values the official configs derive from the head: its schedule and evaluation interval."""
    if cfg.iters is None and cfg.epochs is None and cfg.head in HEAD_ITERS:
        cfg.iters = HEAD_ITERS[cfg.head]
    if cfg.eval_every is None:
        cfg.eval_every = str(max(1, cfg.iters // 10)) if cfg.iters else "1ep"
    _sizes(cfg)


def drop_path_rate(cfg: SegmentConfig) -> float:
    """``--drop-path``, else the official config's rate for the backbone and head (0 for a custom backbone)."""
    if cfg.drop_path is not None:
        return cfg.drop_path
    if not cfg.model:
        return 0.0
    from ..models import MODELS, resolve_name

    arch = resolve_name(cfg.model).arch
    size = arch.removeprefix("xcit_").rsplit("_p", 1)[0]
    return FPN_DROP_PATH.get(size, MODELS[arch].drop_path_rate) if cfg.head == "fpn" else MODELS[arch].drop_path_rate


def _sizes(cfg: SegmentConfig) -> None:
    # 'none' (read as a list of one None) keeps the images' size: None for training, [] at test time (where
    # None means "as --scale")
    if cfg.scale == [None]:
        cfg.scale = None
    if cfg.eval_scale == [None]:
        cfg.eval_scale = []
    for key in ("crop_size", "eval_crop_size", "eval_stride"):
        value = getattr(cfg, key)
        if value is not None:
            require(isinstance(value, list) and len(value) in (1, 2) and all(
                not isinstance(v, bool) and isinstance(v, int) and v >= 1 for v in value),
                f"expected {key} as H [W] with positive integers, got {value!r}")
            setattr(cfg, key, [value[0], value[-1]])


def validate(cfg: SegmentConfig) -> None:
    """Raise ``ValueError`` saying what was expected for an option that cannot work, before anything runs."""
    require(bool(cfg.data), "expected --data ROOT (ROOT/images/SPLIT and ROOT/annotations/SPLIT)")
    validate_dense_options(cfg)
    require_between(cfg, ("min_lr", "aux_weight"))
    require_between(cfg, ["cat_max_ratio"], 0.0, 1.0)
    require(cfg.scale is None or (len(cfg.scale) == 2 and min(cfg.scale) >= 1),
            f"expected --scale LONG SHORT (e.g. 2048 512) or 'none', got {cfg.scale}")
    require(not cfg.eval_scale or (len(cfg.eval_scale) == 2 and min(cfg.eval_scale) >= 1),
            f"expected --eval-scale LONG SHORT or 'none', got {cfg.eval_scale}")
    require(len(cfg.ratio_range) == 2 and 0 < cfg.ratio_range[0] <= cfg.ratio_range[1],
            f"expected --ratio-range LOW HIGH with 0 < LOW <= HIGH, got {cfg.ratio_range}")
