"""Classification on the one training loop: ``xcit train`` (:func:`train`).

What is classification's own is here: the labelled images (in-memory Fashion-MNIST / digits / IDX, or
ImageNet-style class folders), the XCiT and its fine-tuning weights, mixup / cutmix, label smoothing,
DeiT-style distillation, the EMA of the weights, top-1 / top-5 evaluation and ``model.pth``. The loop
(:func:`xcit.train.fit`) does the rest, as for every task.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataError, ImageFolderDataset, TensorImageDataset, build_dataset
from ..data.loader import ShardSampler, build_loader
from ..data.transforms import BatchEvalTransform, BatchTrainTransform, folder_eval_transform, folder_train_transform
from ..models.weights import save_checkpoint
from ..train.loop import fit
from ..train.optim import EpochCosine, WarmupCosine, adamw, param_groups_by_rule
from ..train.task import Batch, FitResult, Task, TrainData
from .config import TrainConfig, resolve_config, validate
from .evaluate import evaluate_model
from .losses import DistillationLoss, LabelCrossEntropy, SoftTargetCrossEntropy
from .model import build_model, build_teacher, drop_path_rate

log = logging.getLogger("xcit.train")


def train(config: TrainConfig | dict | None = None, **options: Any) -> FitResult:
    """Train an XCiT classifier as ``config`` says (a :class:`TrainConfig`, or option values resolved with presets).

    ``train()`` alone trains the Fashion-MNIST preset; ``train(data="digits", epochs=2)`` etc. Under
    ``torchrun`` it runs data-parallel. See :func:`xcit.train.fit` for what every run guarantees.
    """
    return fit(Classification, config, options, resolve_config, validate)


@dataclass
class DataSetup:
    train_set: TensorImageDataset | ImageFolderDataset
    val_set: TensorImageDataset | ImageFolderDataset
    classes: list[str]
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def info(self, cfg: TrainConfig) -> dict:
        """The ``data`` entry of model.pth: what prediction needs to preprocess images the same way."""
        return {"img_size": self.img_size, "in_chans": self.in_chans, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation, "dataset": str(cfg.data)}


def build_data(cfg: TrainConfig) -> DataSetup:
    """Both splits, checked, with the resolution, channels and normalisation the run will use."""
    train_set = build_dataset(cfg.data, cfg.train_split, in_chans=cfg.in_chans)
    val_set = build_dataset(cfg.data, cfg.val_split, in_chans=cfg.in_chans, classes=train_set.classes)
    in_chans = cfg.in_chans or train_set.in_chans
    if isinstance(train_set, TensorImageDataset) and in_chans != train_set.in_chans:
        raise DataError(f"{cfg.data} has {train_set.in_chans}-channel images, in_chans {in_chans} was asked for "
                        "(--finetune converts a checkpoint's stem to the data's channels by itself)")
    if len(train_set.classes) < 2:
        raise DataError(f"expected at least 2 classes to learn in {cfg.data} ({cfg.train_split}), got "
                        f"{len(train_set.classes)}: {', '.join(map(str, train_set.classes)) or 'none'}")
    img_size = cfg.img_size or (train_set.native_size if isinstance(train_set, TensorImageDataset) else 224)
    mean = tuple(cfg.mean) if cfg.mean else tuple(train_set.mean)
    std = tuple(cfg.std) if cfg.std else tuple(train_set.std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"expected {in_chans} mean/std values (one per channel), got {list(mean)} / {list(std)}")
    if len(val_set.classes) != len(train_set.classes):
        raise DataError(f"expected the {len(train_set.classes)} classes of {cfg.train_split} in {cfg.val_split}, got "
                        f"{len(val_set.classes)}")
    return DataSetup(train_set, val_set, list(train_set.classes), img_size, in_chans, mean, std)


class Classification(Task):
    """Supervised classification: the paper's ImageNet recipe by default (REFERENCE 3)."""

    options_type, name, command, primary = TrainConfig, "classify", "xcit train", "top1"
    hint = "Try a lower --lr, --clip-grad 1.0, a longer --warmup-epochs or --amp none."

    def build(self, resuming: bool) -> None:
        cfg, env = self.cfg, self.env
        self.data = data = build_data(cfg)
        aug = dict(crop=cfg.train_crop, crop_scale_min=cfg.crop_scale_min, hflip=cfg.hflip,
                   auto_augment=cfg.auto_augment, reprob=cfg.reprob, interpolation=cfg.interpolation)
        if isinstance(data.train_set, TensorImageDataset):
            self.train_tf = BatchTrainTransform(data.img_size, mean=data.mean, std=data.std, padding=cfg.crop_padding,
                                                **aug)
            eval_tf = BatchEvalTransform(data.img_size, crop_pct=cfg.crop_pct, mean=data.mean, std=data.std,
                                         interpolation=cfg.interpolation)
        else:
            data.train_set.transform = folder_train_transform(data.img_size, mean=data.mean, std=data.std, **aug)
            data.val_set.transform = folder_eval_transform(data.img_size, crop_pct=cfg.crop_pct, mean=data.mean,
                                                           std=data.std, interpolation=cfg.interpolation)
            self.train_tf = eval_tf = None
        self.eval_loader = build_loader(
            data.val_set, ShardSampler(len(data.val_set), num_replicas=env.world_size, rank=env.rank),
            cfg.eval_batch_size or 2 * cfg.batch_size, batch_transform=eval_tf, workers=cfg.workers,
            pin_memory=env.device.type == "cuda")
        self.mixup = None
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
            if cfg.batch_size % 2:
                raise ValueError(f"expected an even --batch-size with mixup/cutmix, got {cfg.batch_size}")
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=len(data.classes))
        # A resumed run takes its weights from the state file, not again from --finetune.
        self.model, self.finetune_note = build_model(cfg, len(data.classes), data.in_chans, finetune=not resuming)
        self.teacher = build_teacher(cfg, len(data.classes), data.in_chans, env.device) if cfg.teacher else None

    def ready(self) -> None:
        cfg = self.cfg
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        base = SoftTargetCrossEntropy() if self.mixup is not None else LabelCrossEntropy(cfg.smoothing)
        if self.teacher is not None and cfg.distillation != "none":
            self.criterion = DistillationLoss(base, self.teacher, cfg.distillation, cfg.distill_alpha, cfg.distill_tau)
        else:
            self.criterion = lambda images, logits, targets: base(logits, targets)
        if self.env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def train_data(self) -> TrainData:
        return TrainData(self.data.train_set, batch_transform=self.train_tf, repeats=self.cfg.repeated_aug)

    def inputs(self) -> list[str]:
        return [p for p in (self.cfg.finetune, self.cfg.teacher) if p]

    def run_name(self) -> list[str]:
        return [self.cfg.data, self.cfg.model]

    def param_groups(self, rule: str) -> list[dict]:
        return param_groups_by_rule(self.model, rule, self.cfg.weight_decay,
                                    exempt_per_channel=self.cfg.wd_exempt_per_channel, layer_decay=self.cfg.layer_decay)

    def optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        return adamw(groups, lr, eps=self.cfg.opt_eps)

    def schedule(self, lr: float, total_steps: int, steps_per_epoch: int) -> Callable[[int], dict[str, float]]:
        cfg = self.cfg
        if cfg.sched_step == "epoch":
            curve = EpochCosine(lr, total_steps / steps_per_epoch, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr,
                                cfg.min_lr, cfg.sched)
        else:
            curve = WarmupCosine(lr, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_lr,
                                 cfg.min_lr, cfg.sched)
        return lambda step: {"lr": curve.lr(step)}

    def prepare(self, raw: Any) -> Batch:
        images, targets, skipped = raw
        if self.mixup is not None and len(images) % 2:  # mixup pairs images: an unreadable one leaves an odd count
            images, targets = images[:-1], targets[:-1]
        if len(images) == 0:
            return Batch(None, 0, len(skipped))
        images = images.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return Batch((images, targets), len(images), len(skipped))

    def loss(self, net: nn.Module, batch: Batch, values: dict[str, float]) -> tuple[torch.Tensor, dict]:
        images, targets = batch.data
        return self.criterion(images, net(images).float(), targets), {}

    def after_step(self, step: int, values: dict[str, float]) -> dict[str, float]:
        if self.ema is not None:
            self.ema.update(self.model, step=step + 1)
        return {}

    def evaluate(self, final: bool) -> dict[str, Any]:
        """Top-1 / top-5 of the reported weights (``--eval-weights``: chosen before training, never by these
        numbers), the other ones logged beside. The final evaluation runs in fp32, as ``xcit eval`` does."""
        cfg, amp = self.cfg, None if final else self.amp_dtype
        # The bare module: DDP's forward would broadcast buffers, and shards differ in length.
        raw = evaluate_model(self.model, self.eval_loader, self.env, amp_dtype=amp, progress=cfg.progress)
        ema = (evaluate_model(self.ema.module, self.eval_loader, self.env, amp_dtype=amp, progress=cfg.progress)
               if self.ema is not None else None)
        reported, other = (ema, raw) if cfg.eval_weights == "ema" else (raw, ema)
        metrics = {**reported, "weights": "ema" if cfg.eval_weights == "ema" else "raw",
                   "precision": "fp32" if amp is None else str(amp).replace("torch.", "")}
        if other is not None:
            prefix = "raw" if cfg.eval_weights == "ema" else "ema"
            metrics.update({f"{prefix}_top1": other["top1"], f"{prefix}_top5": other["top5"]})
        return metrics

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        line = (f"{self.cfg.val_split} top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss "
                f"{metrics['loss']:.4f}  ({metrics['n']} images, {metrics['weights']} weights, {metrics['precision']})")
        if metrics.get("skipped"):
            line += f"; {metrics['skipped']} unreadable, skipped"
        for prefix in ("ema", "raw"):
            if f"{prefix}_top1" in metrics:
                line += f"  {prefix.upper() if prefix == 'ema' else prefix} top-1 {metrics[prefix + '_top1']:.2f}%"
        return line

    def reported_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.eval_weights == "ema" else self.model

    def save_model(self, path: Path, metrics: dict[str, Any] | None, train_info: dict) -> Path:
        cfg, data = self.cfg, self.data
        extra = {"classes": list(data.classes), "data": data.info(cfg), "metrics": {**(metrics or {}),
                                                                                    "split": cfg.val_split},
                 "weights": (metrics or {}).get("weights", "raw"),
                 "train": {**train_info, "model": cfg.model, "preset": cfg.preset}}
        return save_checkpoint(self.reported_model(), path, extra=extra)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.module.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])

    def describe(self) -> list[str]:
        cfg, data = self.cfg, self.data
        arch = ", ".join(f"{k}={v}" for k, v in self.model.arch_config.items()
                         if k in ("patch_size", "embed_dim", "depth", "num_heads"))
        return [f"data {cfg.data}: {len(data.train_set)} train / {len(data.val_set)} {cfg.val_split} images, "
                f"{len(data.classes)} classes, {data.img_size}x{data.img_size}, {data.in_chans} channel(s)",
                f"model {cfg.model} ({arch}): {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M "
                f"parameters, drop path {drop_path_rate(cfg):.2f}; schedule {cfg.sched} moved every {cfg.sched_step}, "
                f"warm-up {cfg.warmup_epochs:g} epochs", self.finetune_note or ""]

    def derived(self) -> dict[str, Any]:
        data = self.data
        return {"drop_path": drop_path_rate(self.cfg), "img_size": data.img_size, "in_chans": data.in_chans,
                "num_classes": len(data.classes), "params": sum(p.numel() for p in self.model.parameters())}

