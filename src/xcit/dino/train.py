"""DINO pretraining of XCiT on the one training loop: ``xcit dino`` (:func:`pretrain`).

What is DINO's own is here: the multi-crop images (labels never read), the student and the EMA
teacher with their heads, the DINO loss and its centre (and DINOv2's KoLeo), the schedules of the lr,
weight decay, teacher momentum and temperature, the frozen last layer, the k-NN evaluation of the
teacher and ``teacher.pth`` (the teacher backbone as a plain XCiT checkpoint:
``xcit.create_model(checkpoint=...)``). The loop (:func:`xcit.train.fit`) does the rest.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataError, TensorImageDataset, build_dataset
from ..models import create_model
from ..models.weights import save_checkpoint
from ..train import distributed as dist_utils
from ..train.loop import fit
from ..train.task import Batch, FitResult, Task, TrainData
from .augment import BatchMultiCrop, MultiCropSpec, PILMultiCrop
from .config import DinoConfig, resolve_config, validate
from .head import DINOHead, MultiCropNet, last_layer_params
from .knn import FeatureModel, FeatureSource, default_crop_pct, embed_splits, knn_scores, topk_hits
from .loss import DINOLoss, koleo_loss
from .schedules import build_schedules

log = logging.getLogger("xcit.train")


def build_networks(cfg: DinoConfig, in_chans: int) -> tuple[MultiCropNet, MultiCropNet]:
    """(student, teacher): identical weights; the teacher has no drop path and takes no gradient."""
    arch = {k: getattr(cfg, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "tokens_norm")
            if getattr(cfg, k) is not None}
    nets = []
    for drop_path in (cfg.drop_path, 0.0):
        backbone = create_model(cfg.model, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path, **arch)
        head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        norm_last_layer=cfg.norm_last_layer)
        nets.append(MultiCropNet(backbone, head))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    s_params = [p.detach() for p in student.parameters()]
    t_params = list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError(f"student and teacher differ: {len(s_params)} vs {len(t_params)} parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def collate_crops(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    from ..data.datasets import SkippedImage

    kept = [b for b in batch if not isinstance(b, SkippedImage)]
    skipped = [b.path for b in batch if isinstance(b, SkippedImage)]
    if not kept:
        return [], torch.empty(0, dtype=torch.long), skipped
    crops = [torch.stack([k[0][i] for k in kept]) for i in range(len(kept[0][0]))]
    return crops, torch.tensor([k[1] for k in kept]), skipped


def pretrain(config: DinoConfig | dict | None = None, **options: Any) -> FitResult:
    """DINO-pretrain an XCiT as ``config`` says (defaults < preset < config < ``options``).

    ``pretrain()`` alone runs the Fashion-MNIST preset. Under ``torchrun`` it is data-parallel. See
    :func:`xcit.train.fit` for what every run guarantees; the teacher backbone is ``result.model_path``.
    """
    return fit(Dino, config, options, resolve_config, validate)


train = pretrain  # the name every task package has


class Dino(Task):
    """DINO: a student matching an EMA teacher's centred, sharpened outputs across multi-crop views."""

    options_type, name, command = DinoConfig, "dino", "xcit dino"
    wd_recipe, primary, model_file = "dino", "knn_top1", "teacher.pth"  # k-NN top-1 of the teacher (when a val split)
    hint = "Try a lower --lr, a smaller --clip-grad or --amp none."

    def build(self, resuming: bool) -> None:
        cfg = self.cfg
        dataset = build_dataset(cfg.data, cfg.train_split, in_chans=cfg.in_chans)
        in_chans = dataset.in_chans
        mean = tuple(cfg.mean) if cfg.mean else tuple(dataset.mean)
        std = tuple(cfg.std) if cfg.std else tuple(dataset.std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"expected {in_chans} mean/std values (one per channel), got {list(mean)} / {list(std)}")
        self.spec = MultiCropSpec.from_config(cfg)
        if isinstance(dataset, TensorImageDataset):
            self.data = TrainData(dataset, batch_transform=BatchMultiCrop(self.spec, mean, std))
        else:
            dataset.transform = PILMultiCrop(self.spec, mean, std)
            self.data = TrainData(dataset, collate=collate_crops)
        self.info = {"img_size": cfg.global_size, "in_chans": in_chans, "mean": list(mean), "std": list(std),
                     "crop_pct": 1.0, "interpolation": "bicubic", "dataset": str(cfg.data)}
        try:  # the k-NN evaluation classifies the validation split, when the data have one
            self.n_val = len(build_dataset(cfg.data, cfg.val_split, in_chans=in_chans, classes=dataset.classes))
        except (DataError, FileNotFoundError, ValueError) as err:
            log.info("no k-NN evaluation: %s", err)
            self.primary, self.n_val = None, 0
        self.model, self.teacher = build_networks(cfg, in_chans)
        self.dino_loss = DINOLoss(cfg.out_dim, self.spec.n_crops, cfg.student_temp, cfg.center_momentum)

    def ready(self) -> None:
        env, cfg = self.env, self.cfg
        self.teacher.to(env.device)
        if env.distributed and cfg.sync_bn:
            self.teacher = dist_utils.convert_batchnorm(self.teacher, env.device).requires_grad_(False)
        self.teacher.train()  # as DINO: batch statistics in the stem's BatchNorm for both networks
        self.dino_loss.to(env.device)
        self.frozen_last = last_layer_params(self.model)

    def train_data(self) -> TrainData:
        return self.data

    def run_name(self) -> list[str]:
        return [self.cfg.data, self.cfg.model]

    def schedule(self, lr: float, total_steps: int, steps_per_epoch: int) -> Callable[[int], dict[str, float]]:
        self.schedules = build_schedules(self.cfg, lr, steps_per_epoch, total_steps)
        return self.schedules.at

    def prepare(self, raw: Any) -> Batch:
        crops, _, skipped = raw
        if not crops:  # every image of the batch unreadable (listed in train.log)
            return Batch(None, 0, len(skipped))
        crops = [c.to(self.env.device, non_blocking=True) for c in crops]
        return Batch(crops, crops[0].shape[0], len(skipped))

    def loss(self, net: nn.Module, batch: Batch, values: dict[str, float]) -> tuple[torch.Tensor, dict]:
        cfg, crops = self.cfg, batch.data
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        if cfg.koleo_weight > 0:
            student_out, features = net(crops, return_features=True)
        else:
            student_out = net(crops)
        loss = self.dino_loss(student_out.float(), teacher_out.float(), values["teacher_temp"], self.env)
        if cfg.koleo_weight <= 0:
            return loss, {}
        # DINOv2's KoLeo on the student's features of the 2 global crops, one crop at a time
        koleo = sum(koleo_loss(f.float()) for f in features[:len(teacher_out)].chunk(2)) / 2
        return loss + cfg.koleo_weight * koleo, {"dino": loss, "koleo": koleo}

    def before_update(self, step: int) -> None:
        if step < self.schedules.freeze_steps:
            for p in self.frozen_last:
                p.grad = None

    def after_step(self, step: int, values: dict[str, float]) -> dict[str, float]:
        update_teacher(self.model, self.teacher, values["momentum"])
        return {"teacher_entropy": self.dino_loss.last_entropy}

    def evaluate(self, final: bool) -> dict[str, Any]:
        """DINO's weighted k-NN (k 20, T 0.07) on the teacher's cls token: the training split's features vote
        for each image of the validation split (resize, centre crop: :func:`~xcit.dino.knn.default_crop_pct`)."""
        cfg, env = self.cfg, self.env
        backbone = self.teacher.backbone
        source = FeatureSource(FeatureModel(backbone), "teacher", cfg.global_size, self.info["in_chans"],
                               tuple(self.info["mean"]), tuple(self.info["std"]), str(cfg.data))
        was_training = backbone.training
        try:
            train_f, train_y, test_f, test_y, classes, seconds = embed_splits(
                source, cfg.data, cfg.train_split, cfg.val_split, env, batch_size=max(2 * cfg.batch_size, 256),
                workers=cfg.workers, amp="none" if final else cfg.amp, crop_pct=default_crop_pct(cfg.data))
        finally:
            backbone.train(was_training)
        counts = topk_hits(knn_scores(train_f, train_y, test_f, len(classes)), test_y) if len(test_y) else \
            torch.zeros(3, dtype=torch.float64)
        counts = dist_utils.all_reduce_sum(counts, env)
        n = int(counts[2])
        self.eval_seconds = seconds
        return {"knn_top1": 100 * float(counts[0]) / n, "knn_top5": 100 * float(counts[1]) / n, "n": n,
                "n_train": len(train_y)}

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return (f"k-NN (teacher cls, k 20) {self.cfg.val_split} top-1 {metrics['knn_top1']:.2f}%  top-5 "
                f"{metrics['knn_top5']:.2f}%  ({metrics['n']} images, {metrics['n_train']} training features, "
                f"{self.eval_seconds:.0f} s)")

    def save_model(self, path: Path, metrics: dict[str, Any] | None, train_info: dict) -> Path:
        extra = {"data": self.info, "dino": {**train_info, "config": self.cfg.to_dict(), "metrics": metrics or {}}}
        # synchronised BatchNorm keeps BatchNorm2d's state dict
        return save_checkpoint(self.teacher.backbone, path, extra=extra)

    def plot(self, run_dir: Path) -> Path | None:
        from .plots import plot_pretraining

        return plot_pretraining(run_dir)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "dino_loss": self.dino_loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.dino_loss.load_state_dict(state["dino_loss"])

    def describe(self) -> list[str]:
        cfg, info = self.cfg, self.info
        return [f"DINO pretraining of {cfg.model} ({info['in_chans']}-channel {cfg.global_size}px globals, "
                f"{cfg.local_crops} local {cfg.local_size}px) on {cfg.data} ({len(self.data.dataset)} images): "
                f"{sum(p.numel() for p in self.model.backbone.parameters()) / 1e6:.2f}M backbone + "
                f"{sum(p.numel() for p in self.model.head.parameters()) / 1e6:.2f}M head parameters, K={cfg.out_dim}, "
                f"{self.spec.n_crops} crops" + (f"; k-NN evaluation on {self.n_val} {cfg.val_split} images"
                                                if self.primary else "")]

    def derived(self) -> dict[str, Any]:
        return {"n_crops": self.spec.n_crops,
                "params_backbone": sum(p.numel() for p in self.model.backbone.parameters()),
                "params_head": sum(p.numel() for p in self.model.head.parameters())}
