"""``xcit detect train`` options: one dataclass (the paper's COCO Mask R-CNN recipe as defaults), validation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import option
from ..train.options import (
    PyramidOptions,
    recipe_default,
    require,
    require_between,
    require_integers,
    resolve_options,
    validate_dense_options,
)

KINDS = ("mask_rcnn", "faster_rcnn")


@dataclass
class DetectConfig(PyramidOptions):
    """Every option of ``xcit detect train``. Defaults are the official COCO recipe (REFERENCE 4,
    docs/fidelity.md): Mask R-CNN + FPN(256), AdamW lr 1e-4 for a global batch of 16 (``--lr-base``,
    ``--lr-base-size``), wd 0.05 (no decay only for names containing 'norm'), 36 epochs with the rate divided
    by 10 after epochs 27 and 33, linear warm-up, evaluation every epoch, 2 images per process (16 over the
    official 8 GPUs), shorter side drawn from 480..800 (longer <= 1333) and the
    DETR-style crop policy, L1 box losses, 1000 proposals kept after NMS in training, aligned RoIAlign
    with adaptive sampling, tested at 800."""

    # --- data
    data: str | None = option(None, "a prepared dataset: ROOT/annotations/{train,val}.json + ROOT/images", "data")
    train_json: str | None = option(None, "COCO file of the training images (default: ROOT/annotations/train.json)", "data")
    val_json: str | None = option(None, "COCO file of the evaluation images (default: ROOT/annotations/val.json if "
                                "present)", "data")
    images: str | None = option(None, "image root for both files (default: ROOT/images for ROOT/annotations/*.json)",
                              "data")
    strict: bool = option(False, "fail on invalid annotations instead of skipping (and counting) them", "data")
    # --- model
    kind: str = option("mask_rcnn", "mask_rcnn (boxes + masks) or faster_rcnn (boxes)", "model", KINDS)
    fpn_channels: int = option(256, "FPN width", "model")
    anchor_sizes: list[int] | None = option(None, "anchor size per level P2..P6 (default 32 64 128 256 512)", "model",
                                          nargs=5)
    box_head_dim: int = option(1024, "box head MLP width", "model")
    mask_head_channels: int = option(256, "mask head conv width", "model")
    rpn_batch_size: int = option(256, "anchors sampled per image for the RPN loss", "model")
    rpn_pre_nms_train: int = option(2000, "proposals kept before NMS per level in training", "model")
    rpn_post_nms_train: int = option(1000, "proposals kept after NMS per image in training (the official configs)",
                                   "model")
    rpn_pre_nms_test: int = option(1000, "proposals kept before NMS per level at test time", "model")
    rpn_post_nms_test: int = option(1000, "proposals kept after NMS per image at test time", "model")
    roi_batch_size: int = option(512, "RoIs sampled per image for the box head", "model")
    detections_per_img: int = option(100, "detections kept per image", "model")
    roi_align: str = option("mmdet", "mmdet (official: aligned, adaptive sampling) or torchvision (aligned=False, "
                          "2 samples)", "model", ("mmdet", "torchvision"))
    box_loss: str = option("l1", "l1 (official) or smooth_l1 (torchvision's, beta 1/9)", "model", ("l1", "smooth_l1"))
    min_size: list[int] | None = option(None, "training shorter sides, one drawn per image (default 480..800 step 32, the official multi-scale "
                                      "sizes); "
                                      "0: native size", "model")
    max_size: int = option(1333, "cap on the longer side", "model")
    test_size: int | None = option(None, "test shorter side (default: the largest training size; 0: native)", "model")
    # --- optimisation
    epochs: float | None = recipe_default("epochs", 36)
    lr_steps: list[float] = option([27 / 36, 33 / 36], "fractions of the run where the rate drops", "optim")
    lr_gamma: float = option(0.1, "drop factor at each of --lr-steps", "optim")
    lr_base: float = recipe_default("lr_base", 1e-4)
    warmup_iters: int = option(500, "linear warm-up steps", "optim")
    warmup_ratio: float = option(0.001, "warm-up starts at this fraction of the rate", "optim")
    # --- augmentation
    hflip: float = option(0.5, "horizontal flip probability", "augment")
    vflip: float = option(0.0, "vertical flip probability (top-down imagery)", "augment")
    rot90: bool = option(False, "random 90-degree turns (top-down imagery)", "augment")
    color_jitter: float = option(0.0, "brightness / contrast / saturation jitter (hue a quarter of it); 0: off",
                               "augment")
    crop_policy: bool = option(True, "the official 3x recipe's DETR-style random crop on half of the images",
                             "augment")
    # --- run (the options shared by every training command are in RunOptions)
    preset: str | None = option(None, "option preset: coco (the official recipe, the default)", "run")


OPTIONS = DetectConfig  # the options dataclass of this task (read by the command line)
PRESETS: dict[str, dict[str, Any]] = {"coco": {}}


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> DetectConfig:
    """A :class:`DetectConfig` from user values: defaults < preset < ``values`` < ``kwargs`` (validated);
    ``data`` fills the COCO file paths of a prepared dataset."""
    return resolve_options(DetectConfig, {**(values or {}), **kwargs}, PRESETS, lambda data: "coco", "detection",
                           validate, complete=_dataset_files)


def _dataset_files(cfg: DetectConfig) -> None:
    if cfg.data:
        root = Path(cfg.data)
        cfg.train_json = cfg.train_json or str(root / "annotations" / "train.json")
        if cfg.val_json is None and (root / "annotations" / "val.json").is_file():
            cfg.val_json = str(root / "annotations" / "val.json")


def validate(cfg: DetectConfig) -> None:
    """Raise ``ValueError`` saying what was expected for an option that cannot work, before anything runs."""
    require(bool(cfg.train_json), "expected --data ROOT (holding annotations/train.json) or --train-json FILE")
    validate_dense_options(cfg)
    require_integers(cfg, ("fpn_channels", "box_head_dim", "mask_head_channels", "rpn_batch_size", "roi_batch_size",
                           "detections_per_img", "max_size"))
    require_between(cfg, ["vflip"], 0.0, 1.0)
    require(all(0 < s <= 1 for s in cfg.lr_steps), f"expected --lr-steps as fractions of the run in (0, 1], got "
                                                  f"{cfg.lr_steps}")


def image_root(json_path: Path, images: str | None) -> Path:
    """``images`` if given; else ROOT/images for ROOT/annotations/X.json; else the JSON's folder."""
    if images:
        return Path(images)
    guess = json_path.parent.parent / "images"
    return guess if json_path.parent.name == "annotations" and guess.is_dir() else json_path.parent

