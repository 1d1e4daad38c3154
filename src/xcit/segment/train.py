"""Segmentation on the one training loop: ``xcit segment train`` (:func:`train`).

What is segmentation's own is here: the image / mask folders and their augmentation, the segmenter
(an XCiT pyramid with a Semantic FPN or UperNet head), the cross-entropy (and auxiliary) losses, the
poly schedule, mIoU and the checkpoint format of ``xcit segment predict``. The loop
(:func:`xcit.train.fit`) does the rest, as for every task.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..train.loop import fit
from ..train.optim import PolySchedule
from ..train.task import Batch, FitResult, Task, TrainData
from .config import SegmentConfig, drop_path_rate, resolve_config, validate
from .data import DatasetInfo, SegmentationFolder, TrainTransform, default_palette, split_dirs
from .evaluate import evaluate
from .model import FORMAT, build_segmenter, save_segmenter, segmenter_config


def train(config: SegmentConfig | dict | None = None, **options: Any) -> FitResult:
    """Train a segmenter as ``config`` says; see :func:`xcit.train.fit` for what every run guarantees."""
    return fit(Segmentation, config, options, resolve_config, validate)


def resolve_dataset(cfg: SegmentConfig) -> tuple[DatasetInfo, int, int, bool]:
    """(dataset info, classes, ignore index, reduce-zero-label) from the options and ROOT/dataset.yaml."""
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"expected --data to be a dataset folder, got {cfg.data}, which does not exist")
    info = DatasetInfo.load(cfg.data) or DatasetInfo()
    num_classes = cfg.num_classes if cfg.num_classes is not None else len(info.classes)
    if num_classes < 2:
        raise ValueError(f"expected --num-classes >= 2 (or 'classes' in {Path(cfg.data) / 'dataset.yaml'}): a "
                         f"segmentation needs 2 classes at least, got {num_classes or 'none'}")
    if info.classes and len(info.classes) != num_classes:
        raise ValueError(f"expected --num-classes {len(info.classes)} (the classes {Path(cfg.data) / 'dataset.yaml'} "
                         f"lists), got {num_classes}")
    ignore = cfg.ignore_index if cfg.ignore_index is not None else info.ignore_index
    rzl = cfg.reduce_zero_label if cfg.reduce_zero_label is not None else info.reduce_zero_label
    info.classes = info.classes or [f"class{i}" for i in range(num_classes)]
    info.palette = info.palette or default_palette(num_classes)
    info.ignore_index, info.reduce_zero_label = ignore, rzl
    return info, num_classes, ignore, rzl


class Segmentation(Task):
    """Semantic segmentation: the paper's ADE20k recipe by default (REFERENCE 4)."""

    options_type, name, command = SegmentConfig, "segment", "xcit segment train"
    wd_recipe, primary, hint = "mmcv", "miou", "Try a lower --lr, a longer --warmup-iters, --clip-grad or --amp none."

    def build(self, resuming: bool) -> None:
        cfg = self.cfg
        self.info, num_classes, ignore, rzl = resolve_dataset(cfg)
        transform = TrainTransform(cfg.crop_size, cfg.scale, cfg.ratio_range, cfg.cat_max_ratio, cfg.hflip,
                                   cfg.photometric, ignore)
        self.train_set = SegmentationFolder(*split_dirs(cfg.data, cfg.train_split), num_classes, ignore_index=ignore,
                                            reduce_zero_label=rzl, transform=transform)
        self.val_set = SegmentationFolder(*split_dirs(cfg.data, cfg.val_split), num_classes, ignore_index=ignore,
                                          reduce_zero_label=rzl)
        self.ignore = ignore
        drop_path = drop_path_rate(cfg)
        # a resumed run's weights come from its state; the backbone's initial weights are then not read
        self.model = build_segmenter(num_classes, cfg.model, None if resuming else cfg.pretrained, head=cfg.head,
                                     out_indices=cfg.out_indices, drop_path_rate=drop_path, arch=cfg.arch(),
                                     channels=cfg.channels, norm=cfg.norm, aux=cfg.aux, fpn_channels=cfg.fpn_channels)
        self.model.backbone.set_grad_checkpointing(cfg.grad_checkpointing)

    def train_data(self) -> TrainData:
        return TrainData(self.train_set, collate=torch.utils.data.default_collate)

    def inputs(self) -> list[str]:
        return [self.cfg.pretrained] if self.cfg.pretrained else []

    def run_name(self) -> list[str]:
        return [self.cfg.data, self.cfg.model or "custom"]

    def schedule(self, lr: float, total_steps: int, steps_per_epoch: int) -> Callable[[int], dict[str, float]]:
        cfg = self.cfg
        poly = PolySchedule(lr, total_steps, cfg.warmup_iters, cfg.warmup_ratio, cfg.power, cfg.min_lr)
        return lambda step: {"lr": poly.lr(step)}

    def prepare(self, raw: Any) -> Batch:
        images, masks = raw
        device = self.env.device
        return Batch((images.to(device, non_blocking=True), masks.to(device, non_blocking=True)), len(images))

    def loss(self, net: nn.Module, batch: Batch, values: dict[str, float]) -> tuple[torch.Tensor, dict]:
        images, masks = batch.data
        outputs = net(images)
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore)
        if aux is None:
            return loss, {}
        aux_loss = F.cross_entropy(aux.float(), masks, ignore_index=self.ignore)
        return loss + self.cfg.aux_weight * aux_loss, {"decode": loss, "aux": aux_loss}

    def evaluate(self, final: bool) -> dict[str, Any]:
        return evaluate(self.model, self.val_set, self.cfg.eval, self.env, None if final else self.amp_dtype,
                        progress=self.cfg.progress)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        ious = " ".join(f"{n}={100 * v:.1f}" for n, v in zip(self.info.classes, metrics["iou"]) if not math.isnan(v))
        return (f"mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['pixel_acc']:.2f}  mean acc "
                f"{100 * metrics['mean_acc']:.2f}  IoU {ious[:400]}")

    def meta(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        info = self.info
        data = {"in_chans": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}  # TrainTransform's and infer's
        meta = {"classes": info.classes, "palette": info.palette, "ignore_index": info.ignore_index,
                "reduce_zero_label": info.reduce_zero_label, "eval": asdict(self.cfg.eval), "data": data,
                "train_config": self.cfg.to_dict()}
        return {**meta, "metrics": metrics} if metrics is not None else meta

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"format": FORMAT, "config": segmenter_config(self.model), "meta": self.meta()}

    def save_model(self, path: Path, metrics: dict[str, Any] | None, train_info: dict) -> Path:
        return save_segmenter(self.model, path, {**self.meta(metrics), "train": train_info})

    def describe(self) -> list[str]:
        return [f"data {self.cfg.data}: {len(self.train_set)} training / {len(self.val_set)} {self.cfg.val_split} "
                 f"images, {len(self.info.classes)} classes; {self.model.head_config['head']} head, "
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters"]

    def derived(self) -> dict[str, Any]:
        return {"eval": asdict(self.cfg.eval), "num_classes": len(self.info.classes)}
