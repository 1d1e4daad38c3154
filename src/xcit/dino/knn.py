"""Frozen features and DINO's weighted k-NN classifier (k = 20, T = 0.07) on L2-normalised features.

Feature sources: any XCiT checkpoint (a DINO teacher, a supervised model, an official release; the
cls token after the final norm, or the mean patch token), the same architecture randomly
initialised, or the raw (normalised) pixels. Under ``torchrun`` every process embeds its shard of
both splits; the training features are gathered on every process, each classifies its test shard
and the hit counts are summed.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import DataError, TensorImageDataset, build_dataset, dataset_kind
from ..data.loader import ShardSampler, build_loader
from ..data.transforms import BatchEvalTransform, folder_eval_transform
from ..models import XCiT, create_model
from ..models.weights import read_metadata
from ..train import distributed as dist_utils
from ..train.run import autocast_context, resolve_amp

POOLS = ("cls", "avg", "cls+avg")


class FeatureModel(nn.Module):
    """Image batch -> (B, D) frozen features: an XCiT's cls token / mean patch token, or the pixels."""

    def __init__(self, backbone: XCiT | None, pool: str = "cls") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"expected pool in {POOLS}, got {pool!r}")
        self.backbone, self.pool = backbone, pool

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return x.flatten(1)
        tokens = self.backbone.forward_features(x)
        parts = {"cls": [tokens[:, 0]], "avg": [tokens[:, 1:].mean(1)], "cls+avg": [tokens[:, 0], tokens[:, 1:].mean(1)]}
        return torch.cat(parts[self.pool], dim=1)


@dataclass
class FeatureSource:
    """A feature model with the preprocessing its inputs need and a label for reports."""

    model: FeatureModel
    label: str
    img_size: int | None
    in_chans: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    dataset: str | None = None  # the dataset the checkpoint records it was trained on


def evaluation_data(source: FeatureSource, data: str | None) -> str:
    """``data`` if given, else the dataset ``source``'s checkpoint records (``xcit train``, ``xcit dino`` and the
    linear probe write it); ``ValueError`` when neither says which images to evaluate on."""
    if data is not None:
        return str(data)
    if source.dataset:
        return source.dataset
    why = ("raw pixel features have no checkpoint to read it from" if source.model.backbone is None
           else f"{source.label} does not record the dataset it was trained on")
    raise ValueError(f"expected --data (the images to evaluate on): {why}")


def load_feature_model(checkpoint: str | os.PathLike | None = None, *, pixels: bool = False, random_init: bool = False,
                       pool: str = "cls", seed: int = 0) -> FeatureSource:
    """Features of ``checkpoint`` (any XCiT weights file), of its architecture freshly initialised
    (``random_init``, seeded), or of the raw pixels (``pixels``, no checkpoint)."""
    if pixels:
        if checkpoint is not None or random_init:
            raise ValueError("expected either pixels=True or a checkpoint (optionally random_init=True), not both")
        return FeatureSource(FeatureModel(None, pool), "raw pixels", None, None, None, None)
    if checkpoint is None:
        raise ValueError("expected a checkpoint (a DINO run's teacher.pth, a model.pth, ...) or pixels=True")
    meta = read_metadata(checkpoint)
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    model = create_model(checkpoint=checkpoint)
    label = str(checkpoint)
    if random_init:
        torch.manual_seed(seed)
        model = XCiT(**model.arch_config)
        label = f"random init ({label}'s architecture, seed {seed})"
    model.eval()
    return FeatureSource(FeatureModel(model, pool), label, data.get("img_size"), model.in_chans,
                         tuple(data["mean"]) if data.get("mean") else None, tuple(data["std"]) if data.get("std") else None,
                         str(data["dataset"]) if data.get("dataset") else None)


def check_eval_options(*, batch_size: int, workers: int, crop_pct: float | None) -> None:
    """``ValueError`` for the shared options of the feature evaluations that cannot run, before any work."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"expected workers >= 0, got {workers!r}")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise ValueError(f"expected crop_pct in (0, 1], got {crop_pct!r}")


DINO_CROP_PCT = 0.875  # eval_knn.py / eval_linear.py: Resize(256) + CenterCrop(224)


def default_crop_pct(data: str) -> float:
    """DINO's 0.875 for image folders; 1.0 for the small in-memory datasets (Fashion-MNIST, digits, IDX),
    whose 28x28 / 8x8 images are whole objects and whose recorded numbers used the full image."""
    try:
        kind = dataset_kind(data)
    except ValueError:  # reported, clearly, when the dataset is built
        return DINO_CROP_PCT
    return 1.0 if kind in ("fashion-mnist", "digits", "idx") else DINO_CROP_PCT


def feature_dataset(source: FeatureSource, data: str, split: str, classes: list[str] | None = None):
    """(dataset, image size, mean, std) of ``split`` as ``source`` expects its inputs."""
    chans = source.in_chans or (1 if dataset_kind(data) in ("fashion-mnist", "digits", "idx") else 3)
    dataset = build_dataset(data, split, in_chans=chans, classes=classes if dataset_kind(data) == "folder" else None)
    size = source.img_size or (dataset.native_size if isinstance(dataset, TensorImageDataset) else 224)
    return dataset, size, source.mean or tuple(dataset.mean), source.std or tuple(dataset.std)


def eval_loader(source: FeatureSource, data: str, split: str, env: dist_utils.DistEnv, batch_size: int, workers: int,
                classes: list[str] | None = None, crop_pct: float | None = None):
    """(sharded loader, dataset) of ``split`` with the evaluation preprocessing of ``source`` (resize to
    size / ``crop_pct``, centre crop; :func:`default_crop_pct` when not given)."""
    dataset, size, mean, std = feature_dataset(source, data, split, classes)
    crop_pct = default_crop_pct(data) if crop_pct is None else crop_pct
    if isinstance(dataset, TensorImageDataset):
        tf = BatchEvalTransform(size, crop_pct=crop_pct, mean=mean, std=std)
    else:
        dataset.transform = folder_eval_transform(size, crop_pct=crop_pct, mean=mean, std=std)
        tf = None
    sampler = ShardSampler(len(dataset), num_replicas=env.world_size, rank=env.rank)
    return build_loader(dataset, sampler, batch_size, batch_transform=tf, workers=workers,
                        pin_memory=env.device.type == "cuda"), dataset


@torch.no_grad()
def extract_features(model: nn.Module, loader, env: dist_utils.DistEnv | None = None, *,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)) of this process's share of ``loader``."""
    env = env or dist_utils.DistEnv()
    feats, labels = [], []
    for images, targets, _ in loader:
        if len(images) == 0:
            continue
        with autocast_context(env.device, amp_dtype):
            out = model(images.to(env.device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(targets)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def gather(tensor: torch.Tensor, env: dist_utils.DistEnv) -> torch.Tensor:
    """The concatenation of every process's ``tensor`` (rank order), on every process."""
    if not env.distributed:
        return tensor
    import torch.distributed as dist

    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat([p for p in parts if p.numel()])


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted vote: (N_test, num_classes) sums of ``exp(cos / T)`` over the ``k`` nearest
    training features by cosine similarity (features are L2-normalised here)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"expected k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(train_features) == 0:
        raise DataError("no training features for k-NN")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"expected features of one width, got {train_features.shape[1]} and {test_features.shape[1]}")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test_features), chunk):
        test = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits, count) as a float64 tensor, ready to be summed over processes."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(), len(labels)], dtype=torch.float64)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int | None = None, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN classifier on one process's data."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    counts = topk_hits(knn_scores(train_features, train_labels, test_features, num_classes, k, temperature), test_labels)
    return {"top1": 100 * float(counts[0] / counts[2]), "top5": 100 * float(counts[1] / counts[2]), "n": int(counts[2])}


def embed_splits(source: FeatureSource, data: str, train_split: str, test_split: str, env: dist_utils.DistEnv, *,
                 batch_size: int = 500, workers: int = 4, amp: str = "none", crop_pct: float | None = None):
    """(train features and labels gathered from all processes, this process's test features and labels,
    class names, seconds spent). Both splits are resized to size / ``crop_pct`` and centre-cropped."""
    t0 = time.time()
    train_loader, train_set = eval_loader(source, data, train_split, env, batch_size, workers, crop_pct=crop_pct)
    test_loader, test_set = eval_loader(source, data, test_split, env, batch_size, workers, classes=list(train_set.classes),
                                        crop_pct=crop_pct)
    if len(test_set.classes) != len(train_set.classes):
        raise DataError(f"{test_split} has {len(test_set.classes)} classes, {train_split} {len(train_set.classes)}")
    model = source.model.to(env.device).eval()
    amp_dtype = resolve_amp(amp, env.device)
    train_f, train_y = extract_features(model, train_loader, env, amp_dtype=amp_dtype)
    test_f, test_y = extract_features(model, test_loader, env, amp_dtype=amp_dtype)
    return gather(train_f, env), gather(train_y, env), test_f, test_y, list(train_set.classes), time.time() - t0


def knn_evaluate(checkpoint: str | os.PathLike | None = None, data: str | None = None, *, pixels: bool = False,
                 random_init: bool = False, train_split: str = "train", test_split: str = "val", k: int = 20,
                 temperature: float = 0.07, pool: str = "cls", batch_size: int = 500, device: str = "auto",
                 workers: int = 4, amp: str = "none", seed: int = 0, crop_pct: float | None = None) -> dict[str, Any]:
    """Weighted k-NN top-1 / top-5 (%) of frozen features: train-split features vote for test images.

    Preprocessing as DINO's ``eval_knn.py``: resize to size / ``crop_pct`` and centre crop (default
    :func:`default_crop_pct`: 0.875 for image folders, 1.0 for the small in-memory datasets). ``data``
    defaults to the dataset the checkpoint records (:func:`evaluation_data`)."""
    check_eval_options(batch_size=batch_size, workers=workers, crop_pct=crop_pct)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"expected k >= 1 neighbours, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"expected a temperature > 0, got {temperature!r}")
    source = load_feature_model(checkpoint, pixels=pixels, random_init=random_init, pool=pool, seed=seed)
    data = evaluation_data(source, data)
    env = dist_utils.setup(device)
    try:
        train_f, train_y, test_f, test_y, classes, t_embed = embed_splits(
            source, data, train_split, test_split, env, batch_size=batch_size, workers=workers, amp=amp,
            crop_pct=crop_pct)
        t0 = time.time()
        counts = topk_hits(knn_scores(train_f, train_y, test_f, len(classes), k, temperature), test_y) \
            if len(test_y) else torch.zeros(3, dtype=torch.float64)
        counts = dist_utils.all_reduce_sum(counts, env)
    finally:
        dist_utils.cleanup(env)
    n = int(counts[2])
    return {"top1": 100 * float(counts[0]) / n, "top5": 100 * float(counts[1]) / n, "n": n, "n_train": len(train_y),
            "k": k, "temperature": temperature, "crop_pct": default_crop_pct(data) if crop_pct is None else crop_pct,
            "pool": pool if not pixels else "pixels", "features": source.label,
            "dim": int(train_f.shape[1]), "data": str(data), "split": test_split,
            "seconds": round(t_embed + time.time() - t0, 1)}
