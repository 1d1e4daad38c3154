"""Linear probe on frozen features: ``xcit linear`` on the one training loop (:func:`train`, :func:`linear_probe`).

Two protocols (``--protocol``, which is also the preset):

* ``"dino"`` (default): DINO's ``eval_linear.py`` for XCiT: the frozen network (eval mode) embeds
  random-resized crops with flips of the training images at every step, the cls token feeds a
  linear layer (weights N(0, 0.01), bias 0) trained with SGD (momentum 0.9, no weight decay, lr
  0.001 x global batch / 256, batch 128 per process, cosine over epochs to 0, moved once per epoch as
  ``CosineAnnealingLR``) for 100 epochs; test images are resized to size / 0.875 and centre-cropped.
  The final classifier is reported (DINO prints the best test accuracy over epochs, a selection on
  the test split).
* ``"precomputed"``: the fast probe: features computed once, without augmentation, standardised with
  the training split's statistics; zero-initialised layer, SGD lr 0.1 (as given, not scaled), batch 256,
  cosine over steps. On a CPU it takes seconds, but its numbers cannot be set beside the paper's.

The run is an ordinary training run (``--output`` folder, ``--resume``, ``--time-budget-min``, ...): its
``model.pth`` is the probe as an XCiT classifier (the backbone with the standardisation folded into its
head: ``xcit eval`` / ``xcit predict`` read it) when the features are a checkpoint's cls token, else the
linear layer alone; ``result.json`` holds top-1 / top-5 on the test split.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import option
from ..data.datasets import DataError, TensorImageDataset
from ..data.transforms import BatchTrainTransform, folder_train_transform
from ..models.weights import save_checkpoint
from ..train import distributed as dist_utils
from ..train.loop import fit
from ..train.options import OptimOptions, recipe_default, require, resolve_options, validate_run_options
from ..train.task import Batch, FitResult, Task, TrainData
from .knn import (
    POOLS,
    default_crop_pct,
    embed_splits,
    eval_loader,
    evaluation_data,
    extract_features,
    feature_dataset,
    load_feature_model,
    topk_hits,
)

PROTOCOLS = ("dino", "precomputed")


@dataclass
class LinearConfig(OptimOptions):
    """Every option of ``xcit linear``; the defaults are DINO's ``eval_linear.py`` (the ``dino`` protocol)."""

    checkpoint: str | None = option(None, "XCiT weights whose frozen features are probed (a DINO teacher.pth or "
                                  "last.pt, a supervised model.pth, an official file); omit with --pixels", "model")
    pixels: bool = option(False, "use the normalised pixels as features (a baseline)", "model")
    random_init: bool = option(False, "the checkpoint's architecture, randomly initialised (seeded by --seed)",
                               "model")
    pool: str = option("cls", "feature: cls token after the final norm (DINO's), mean patch token, or both", "model",
                       POOLS)
    data: str | None = option(None, "fashion-mnist, digits, an IDX folder or class folders (default: the dataset the "
                            "checkpoint records it was trained on)", "data")
    train_split: str = option("train", "split the probe is trained on", "data")
    test_split: str = option("val", "split it is tested on (Fashion-MNIST: val = its 10k test images)", "data")
    crop_pct: float | None = option(None, "test (and precomputed-feature) preprocessing: resize to size / crop-pct, "
                                  "centre crop (default: DINO's 0.875 for image folders; 1.0 for Fashion-MNIST, "
                                  "digits and IDX data)", "data")
    protocol: str = option("dino", "dino: DINO's eval_linear.py; precomputed: the fast probe on features computed "
                         "once (its own defaults: lr 0.1 as given, batch 256)", "optim", PROTOCOLS)
    eval_batch_size: int = option(500, "images per forward pass when embedding (evaluation, precomputed features)",
                                  "optim")
    epochs: float | None = recipe_default("epochs", 100)
    batch_size: int = recipe_default("batch_size", 128)
    lr_base: float = recipe_default("lr_base", 1e-3)
    lr_base_size: int = recipe_default("lr_base_size", 256)
    weight_decay: float = recipe_default("weight_decay", 0.0)
    eval_every: str = recipe_default("eval_every", "0")
    preset: str | None = option(None, "option preset: the protocol's defaults (dino, precomputed)", "run")


OPTIONS = LinearConfig  # the options dataclass of this task (read by the command line)
# DINO's eval_linear.py runs in fp32 (no autocast); the precomputed probe's lr is an absolute one.
PRESETS: dict[str, dict[str, Any]] = {"dino": {"amp": "none"},
                                      "precomputed": {"amp": "none", "lr": 0.1, "batch_size": 256}}


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> LinearConfig:
    """A :class:`LinearConfig` from user values: defaults < the protocol's preset < ``values`` < ``kwargs``."""
    given = {k.replace("-", "_"): v for k, v in {**(values or {}), **kwargs}.items()}
    given.setdefault("preset", given.get("protocol") or "dino")
    return resolve_options(LinearConfig, given, PRESETS, lambda data: "dino", "linear probe", validate)


def validate(cfg: LinearConfig) -> None:
    """Raise ``ValueError`` saying what was expected for an option that cannot work."""
    validate_run_options(cfg)
    require(cfg.protocol in PROTOCOLS, f"expected protocol in {PROTOCOLS}, got {cfg.protocol!r}")
    require(cfg.protocol != "dino" or not cfg.weight_decay,
            "expected no weight decay with protocol dino (DINO applies none); use --protocol precomputed")
    require(cfg.pool in POOLS, f"expected pool in {POOLS}, got {cfg.pool!r}")
    require(cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, f"expected crop_pct in (0, 1], got {cfg.crop_pct}")
    require(cfg.eval_batch_size >= 1, f"expected eval_batch_size >= 1, got {cfg.eval_batch_size}")
    if cfg.pixels and (cfg.checkpoint or cfg.random_init):
        raise ValueError("expected either --pixels or a checkpoint (optionally --random-init), not both")
    if not cfg.pixels and not cfg.checkpoint:
        raise ValueError("expected a checkpoint (a DINO run's teacher.pth, a model.pth, ...) or --pixels")


def train(config: LinearConfig | dict | None = None, **options: Any) -> FitResult:
    """Train and test a linear probe as ``config`` says; see :func:`xcit.train.fit` for what every run guarantees."""
    return fit(LinearProbe, config, options, resolve_config, validate)


def linear_probe(checkpoint: str | None = None, data: str | None = None, **options: Any) -> dict[str, Any]:
    """Top-1 / top-5 (%) of a linear probe on frozen features (:func:`train`), with what was probed."""
    result = train(checkpoint=None if checkpoint is None else str(checkpoint), data=data, **options)
    return {**result.metrics, "output": str(result.model_path), "run_dir": str(result.run_dir)}


def dino_linear_head(dim: int, num_classes: int) -> nn.Linear:
    """DINO's ``LinearClassifier``: weights N(0, 0.01), bias 0."""
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


class ProbeNet(nn.Module):
    """A frozen feature model (always in eval mode, no gradient) under a trained linear head."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features, self.head = features.requires_grad_(False).eval(), head

    def train(self, mode: bool = True) -> ProbeNet:
        self.training = mode
        self.head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.features(x)
        return self.head(feats.float())


class FeatureSet(torch.utils.data.Dataset):
    """Precomputed (standardised) features and their labels."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]


class LinearProbe(Task):
    """A linear classifier on frozen features, trained and tested (DINO's protocol by default)."""

    options_type, name, command, primary = LinearConfig, "linear", "xcit linear", "top1"
    wd_recipe = "the linear layer's"  # --wd-rule does not apply: the probe has one group, the linear layer
    hint = "Try a lower --lr or --protocol precomputed."

    def build(self, resuming: bool) -> None:
        cfg, env = self.cfg, self.env
        self.source = load_feature_model(cfg.checkpoint, pixels=cfg.pixels, random_init=cfg.random_init,
                                         pool=cfg.pool, seed=cfg.seed)
        self.data = evaluation_data(self.source, cfg.data)
        self.crop_pct = default_crop_pct(self.data) if cfg.crop_pct is None else cfg.crop_pct
        if cfg.protocol == "precomputed":
            train_f, train_y, self.test_f, self.test_y, self.classes, _ = embed_splits(
                self.source, self.data, cfg.train_split, cfg.test_split, env, batch_size=cfg.eval_batch_size,
                workers=cfg.workers, amp=cfg.amp, crop_pct=self.crop_pct)
            self.mean, self.std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
            self.train_set = FeatureSet((train_f - self.mean) / self.std, train_y)
            self.model = nn.Linear(train_f.shape[1], len(self.classes))
            nn.init.zeros_(self.model.weight)
            nn.init.zeros_(self.model.bias)
            self.train_tf = None
            self.input_preprocessing = feature_dataset(self.source, self.data, cfg.test_split)[1:]
            return
        dataset, size, mean, std = feature_dataset(self.source, self.data, cfg.train_split)
        self.input_preprocessing = (size, mean, std)  # what the features were computed from
        aug = dict(mean=mean, std=std, crop="random-resized", crop_scale_min=0.08, hflip=0.5, interpolation="bilinear")
        if isinstance(dataset, TensorImageDataset):
            self.train_tf = BatchTrainTransform(size, auto_augment=None, reprob=0.0, **aug)
        else:
            dataset.transform = folder_train_transform(size, auto_augment=None, reprob=0.0, **aug)
            self.train_tf = None
        self.test_loader, test_set = eval_loader(self.source, self.data, cfg.test_split, env, cfg.eval_batch_size,
                                                 cfg.workers, classes=list(dataset.classes), crop_pct=self.crop_pct)
        if len(test_set.classes) != len(dataset.classes):
            raise DataError(f"expected the {len(dataset.classes)} classes of {cfg.train_split} in {cfg.test_split}, "
                            f"got {len(test_set.classes)}")
        self.train_set, self.classes = dataset, list(dataset.classes)
        with torch.no_grad():
            dim = int(self.source.model(next(iter(self.test_loader))[0][:1]).shape[1])
        self.mean, self.std = torch.zeros(dim), torch.ones(dim)
        self.model = ProbeNet(self.source.model, dino_linear_head(dim, len(self.classes)))

    def train_data(self) -> TrainData:
        collate = torch.utils.data.default_collate if self.cfg.protocol == "precomputed" else None
        return TrainData(self.train_set, collate=collate, batch_transform=self.train_tf)

    def inputs(self) -> list[str]:
        return [self.cfg.checkpoint] if self.cfg.checkpoint else []

    def run_name(self) -> list[str]:
        return [self.data, Path(self.cfg.checkpoint).stem if self.cfg.checkpoint else "pixels"]

    def head(self) -> nn.Linear:
        return self.model.head if isinstance(self.model, ProbeNet) else self.model

    def param_groups(self, rule: str) -> list[dict]:
        """One group, the linear layer: the weight-decay rules are about backbones (DINO applies none at all)."""
        return [{"params": list(self.head().parameters()), "weight_decay": self.cfg.weight_decay, "lr_scale": 1.0,
                 "decayed": True}]

    def optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)

    def schedule(self, lr: float, total_steps: int, steps_per_epoch: int) -> Callable[[int], dict[str, float]]:
        """Cosine to 0: per epoch for DINO's protocol (``CosineAnnealingLR(epochs)`` stepped after each epoch),
        per step for the precomputed one."""
        if self.cfg.protocol == "dino":
            epochs = total_steps / steps_per_epoch
            return lambda step: {"lr": lr * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / epochs))}
        return lambda step: {"lr": lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))}

    def prepare(self, raw: Any) -> Batch:
        inputs, labels = raw[0], raw[1]
        skipped = len(raw[2]) if len(raw) > 2 else 0
        if len(inputs) == 0:
            return Batch(None, 0, skipped)
        device = self.env.device
        return Batch((inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)), len(inputs),
                     skipped)

    def loss(self, net: nn.Module, batch: Batch, values: dict[str, float]) -> tuple[torch.Tensor, dict]:
        inputs, labels = batch.data
        return F.cross_entropy(net(inputs).float(), labels), {}

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict[str, Any]:
        """Top-1 / top-5 on the test split (each process its shard; the hits are summed)."""
        head = self.head()
        if self.cfg.protocol == "precomputed":
            test_f, test_y = (self.test_f - self.mean) / self.std, self.test_y
        else:
            test_f, test_y = extract_features(self.source.model, self.test_loader, self.env)
        scores = head(test_f.to(self.env.device)).cpu()
        counts = topk_hits(scores, test_y) if len(test_y) else torch.zeros(3, dtype=torch.float64)
        counts = dist_utils.all_reduce_sum(counts, self.env)
        n = int(counts[2])
        if n == 0:
            raise DataError(f"no image of {self.cfg.test_split} could be read")
        return {"top1": 100 * float(counts[0]) / n, "top5": 100 * float(counts[1]) / n, "n": n,
                "n_train": len(self.train_set), "dim": int(head.in_features)}

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return (f"linear probe ({self.cfg.protocol}) on {self.data} {self.cfg.test_split}: top-1 {metrics['top1']:.2f}%"
                f"  top-5 {metrics['top5']:.2f}%  ({metrics['n']} images, {metrics['n_train']} training images, "
                f"features: {self.source.label}, dim {metrics['dim']})")

    def save_model(self, path: Path, metrics: dict[str, Any] | None, train_info: dict) -> Path:
        """The probe as an XCiT classifier (backbone + standardisation folded into the head) when the features are a
        checkpoint's cls token; else the linear layer alone (with its standardisation)."""
        head = copy.deepcopy(self.head()).cpu()
        info = {"source": self.source.label, "protocol": self.cfg.protocol, "pool": self.cfg.pool,
                "metrics": metrics or {}, "train": train_info}
        backbone = self.source.model.backbone
        if backbone is None or self.cfg.pool != "cls":
            return save_checkpoint(head, path, extra={"classes": self.classes, "linear_probe": info,
                                                      "mean": self.mean, "std": self.std})
        model = copy.deepcopy(backbone).cpu()
        model.reset_classifier(len(self.classes))
        with torch.no_grad():  # head((f - mean) / std) = (W / std) f + (b - W mean / std)
            model.head.weight.copy_(head.weight / self.std)
            model.head.bias.copy_(head.bias - (head.weight * (self.mean / self.std)).sum(1))
        size, mean, std = self.input_preprocessing
        data = {"img_size": size, "in_chans": backbone.in_chans, "mean": list(mean), "std": list(std),
                "crop_pct": self.crop_pct, "interpolation": "bicubic", "dataset": str(self.data)}
        return save_checkpoint(model, path, extra={"classes": self.classes, "data": data, "linear_probe": info})

    def describe(self) -> list[str]:
        return [f"linear probe ({self.cfg.protocol} protocol) of {self.source.label} ({self.cfg.pool}) on {self.data}: "
                f"{len(self.train_set)} {self.cfg.train_split} images, {len(self.classes)} classes"]

    def derived(self) -> dict[str, Any]:
        return {"data": str(self.data), "crop_pct": self.crop_pct, "num_classes": len(self.classes)}
