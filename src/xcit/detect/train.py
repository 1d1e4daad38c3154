"""Detection on the one training loop: ``xcit detect train`` (:func:`train`).

What is detection's own is here: the COCO-format data and their augmentation, the detector (torchvision's
Mask / Faster R-CNN on the XCiT pyramid), its losses, the step schedule, COCO box / mask AP and the
checkpoint format of ``xcit detect predict``. The loop (:func:`xcit.train.fit`) does the rest.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train import distributed as dist_utils
from ..train.loop import fit
from ..train.optim import StepSchedule
from ..train.task import Batch, FitResult, Task, TrainData
from .coco import CocoDetection, collate
from .config import DetectConfig, image_root, resolve_config, validate
from .evaluation import evaluate_results, format_metrics, predict_dataset
from .model import FORMAT, build_detector, detector_state


def train(config: DetectConfig | dict | None = None, **options: Any) -> FitResult:
    """Train a detector as ``config`` says; see :func:`xcit.train.fit` for what every run guarantees."""
    return fit(Detection, config, options, resolve_config, validate)


def build_from_config(cfg: DetectConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The detector the options describe (the backbone's initial weights read only with ``pretrained``)."""
    settings = {k: getattr(cfg, k) for k in (
        "kind", "fpn_channels", "anchor_sizes", "min_size", "max_size", "test_size", "box_head_dim", "mask_head_channels",
        "rpn_batch_size", "rpn_pre_nms_train", "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test",
        "detections_per_img", "roi_align", "box_loss")}
    return build_detector(num_classes, cfg.model, cfg.pretrained if pretrained else None, out_indices=cfg.out_indices,
                          drop_path_rate=cfg.drop_path, arch=cfg.arch(), roi_batch_size=cfg.roi_batch_size, **settings)


def evaluate(model, dataset: CocoDetection, ctx: dist_utils.DistEnv, amp_dtype=None, progress: bool = False) -> dict:
    """COCO metrics of ``model`` on ``dataset``; images are shared out over processes, rank 0 scores."""
    results = predict_dataset(model, dataset, ctx.device, range(ctx.rank, len(dataset), ctx.world_size), amp_dtype, progress)
    if ctx.distributed:
        gathered: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    net = getattr(model, "module", model)
    return evaluate_results(dataset, results, net.roi_heads.has_mask())


def flat_metrics(metrics: dict) -> dict[str, float]:
    """{"box_ap": .., "box_ap50": .., "mask_ap": ..} for logs and summaries."""
    prefix = {"bbox": "box", "segm": "mask"}
    return {f"{prefix[k]}_{name.lower()}": v for k, m in metrics.items() for name, v in m.items()}


class Detection(Task):
    """Object detection and instance segmentation: the paper's COCO Mask R-CNN 3x recipe by default (REFERENCE 4)."""

    options_type, name, command, wd_recipe = DetectConfig, "detect", "xcit detect train", "mmcv"
    primary = "mask_ap"  # box_ap for Faster R-CNN; no evaluation without validation data

    def build(self, resuming: bool) -> None:
        cfg = self.cfg
        train_json, val_json = Path(cfg.train_json), Path(cfg.val_json) if cfg.val_json else None
        masks = cfg.kind == "mask_rcnn"
        self.train_set = CocoDetection(train_json, image_root(train_json, cfg.images), masks=masks, train=True,
                                       hflip=cfg.hflip, vflip=cfg.vflip, rot90=cfg.rot90, color_jitter=cfg.color_jitter,
                                       crop_policy=cfg.crop_policy, strict=cfg.strict)
        self.val_set = (CocoDetection(val_json, image_root(val_json, cfg.images), masks=masks, strict=cfg.strict)
                        if val_json else None)
        if self.val_set is not None and self.val_set.class_names != self.train_set.class_names:
            raise ValueError(f"expected the categories of {train_json} ({self.train_set.class_names}) in {val_json}, "
                             f"got {self.val_set.class_names}")
        self.primary = ("mask_ap" if masks else "box_ap") if self.val_set is not None else None
        self.meta = {"classes": self.train_set.class_names,
                     "category_ids": [c["id"] for c in self.train_set.categories], "train_config": cfg.to_dict()}
        self.model = build_from_config(cfg, len(self.train_set.categories), pretrained=not resuming)

    def train_data(self) -> TrainData:
        return TrainData(self.train_set, collate=collate)

    def inputs(self) -> list[str]:
        return [self.cfg.pretrained] if self.cfg.pretrained else []

    def run_name(self) -> list[str]:
        return [self.cfg.data or Path(self.cfg.train_json).stem, self.cfg.model or "custom"]

    def schedule(self, lr: float, total_steps: int, steps_per_epoch: int) -> Callable[[int], dict[str, float]]:
        """The official step schedule: linear warm-up, the rate x ``lr_gamma`` at each of ``lr_steps``."""
        steps = StepSchedule(lr, total_steps, self.cfg.lr_steps, self.cfg.lr_gamma, self.cfg.warmup_iters,
                             self.cfg.warmup_ratio)
        return lambda step: {"lr": steps.lr(step)}

    def prepare(self, raw: Any) -> Batch:
        to = dict(device=self.env.device, non_blocking=True)
        images = [image.to(**to) for image in raw[0]]
        return Batch((images, [{k: v.to(**to) for k, v in t.items()} for t in raw[1]]), len(images))

    def loss(self, net: nn.Module, batch: Batch, values: dict[str, float]) -> tuple[torch.Tensor, dict]:
        losses = net(*batch.data)
        return sum(v.float() for v in losses.values()), losses

    def evaluate(self, final: bool) -> dict[str, Any]:
        metrics = evaluate(self.model, self.val_set, self.env, None if final else self.amp_dtype)
        self.table = format_metrics(metrics)
        return flat_metrics(metrics)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        keys = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")
        return "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in keys if k in metrics)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"format": FORMAT, "config": dict(self.model.detector_config), "meta": self.meta}

    def save_model(self, path: Path, metrics: dict[str, Any] | None, train_info: dict) -> Path:
        from ..train.checkpoint import save_state

        meta = {**self.meta, "train": train_info, **({"metrics": metrics} if metrics else {})}
        return save_state(path, detector_state(self.model, meta))

    def describe(self) -> list[str]:
        cfg, lines = self.cfg, [f"data: {self.train_set.report.summary()}"]
        if self.val_set is not None:
            lines.append(f"validation: {self.val_set.report.summary()}")
        lines.append(f"{cfg.kind} on {len(self.train_set)} images ({', '.join(self.train_set.class_names)}), "
                     f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters")
        return lines

    def derived(self) -> dict[str, Any]:
        return {"num_classes": len(self.train_set.categories)}
