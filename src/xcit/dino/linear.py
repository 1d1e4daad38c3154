"""Linear probe: a linear classifier trained on frozen features, reported as top-1 / top-5 on the test split.

Two protocols:

* ``"dino"`` (default): DINO's ``eval_linear.py`` for XCiT: the frozen network (eval mode) embeds
  random-resized crops with flips of the training images at every step, the cls token feeds a
  linear layer (weights N(0, 0.01), bias 0) trained with SGD (momentum 0.9, no weight decay, lr
  0.001 x global batch / 256, batch 128 per process, cosine over epochs to 0) for 100 epochs; test
  images are resized to size / 0.875 and centre-cropped. The final epoch's classifier is reported
  (DINO prints the best test accuracy over epochs, a selection on the test split).
* ``"precomputed"``: the fast probe: features computed once, without augmentation, standardised
  with the training split's statistics; zero-initialised layer, SGD lr 0.1, cosine over steps. On
  a CPU it takes seconds, but its numbers cannot be set beside the paper's.

Under ``torchrun`` each process trains on its share of every batch with gradients averaged over
processes, and the test hits are summed.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import DataError, TensorImageDataset
from ..data.loader import RepeatAugSampler, build_loader
from ..data.outputs import claim_file
from ..data.transforms import BatchTrainTransform, folder_train_transform
from ..models import XCiT
from ..models.weights import save_checkpoint
from ..train import distributed as dist_utils
from ..train.run import autocast_context, resolve_amp
from .knn import (
    check_eval_options,
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
# DINO's eval_linear.py defaults: (lr per 256 images, batch per process) / the precomputed probe's (lr, batch)
PROTOCOL_DEFAULTS = {"dino": {"lr": 0.001, "probe_batch_size": 128},
                     "precomputed": {"lr": 0.1, "probe_batch_size": 256}}


def _average_grads(head: nn.Module, env: dist_utils.DistEnv) -> None:
    if not env.distributed:
        return
    grads = torch.cat([p.grad.flatten() for p in head.parameters()]).double()
    grads = dist_utils.all_reduce_sum(grads, env) / env.world_size
    offset = 0
    for p in head.parameters():
        p.grad.copy_(grads[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def train_linear(train_f: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, epochs: int = 100,
                 batch_size: int = 256, lr: float = 0.1, weight_decay: float = 0.0, seed: int = 0,
                 env: dist_utils.DistEnv | None = None) -> nn.Linear:
    """SGD (momentum 0.9, cosine lr) on cross-entropy; ``train_f`` should be standardised.

    Every process holds all features; each takes its share of every batch and gradients are averaged.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0:
        raise ValueError(f"expected epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; got {epochs}, "
                         f"{batch_size}, {lr}, {weight_decay}")
    env = env or dist_utils.DistEnv()
    torch.manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_f) // batch_size)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_f), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size][env.rank::env.world_size]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(head, env)
            opt.step()
            step += 1
    return head


def dino_linear_head(dim: int, num_classes: int) -> nn.Linear:
    """DINO's ``LinearClassifier``: weights N(0, 0.01), bias 0."""
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def train_linear_augmented(model: nn.Module, loader, sampler, dim: int, num_classes: int, *, epochs: int = 100,
                           lr: float = 0.001, env: dist_utils.DistEnv | None = None,
                           amp_dtype: torch.dtype | None = None) -> nn.Linear:
    """DINO's loop: frozen ``model`` (eval mode, no gradients) embeds every augmented batch; SGD
    (momentum 0.9, no weight decay) at ``lr`` (already scaled) with ``CosineAnnealingLR(epochs, 0)``
    stepped after each epoch; gradients averaged over processes."""
    env = env or dist_utils.DistEnv()
    head = dino_linear_head(dim, num_classes).to(env.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    model.eval()
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        sampler.set_epoch(epoch)
        for images, targets, _ in loader:
            if len(images) == 0:
                continue
            with torch.no_grad(), autocast_context(env.device, amp_dtype):
                feats = model(images.to(env.device, non_blocking=True))
            loss = F.cross_entropy(head(feats.float()), targets.to(env.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(head, env)
            opt.step()
    return head.cpu()


def linear_probe(checkpoint: str | os.PathLike | None = None, data: str | None = None, *, pixels: bool = False,
                 random_init: bool = False, train_split: str = "train", test_split: str = "val", pool: str = "cls",
                 protocol: str = "dino", epochs: int = 100, lr: float | None = None, weight_decay: float = 0.0,
                 probe_batch_size: int | None = None, crop_pct: float | None = None, batch_size: int = 500,
                 device: str = "auto", workers: int = 4, amp: str = "none", seed: int = 0,
                 output: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train a linear classifier on frozen features of the train split; top-1 / top-5 (%) on the test split.

    ``protocol`` is ``"dino"`` (DINO's, the default; ``lr`` per 256 images) or ``"precomputed"`` (the
    fast probe; ``lr`` as given, ``weight_decay`` allowed); ``lr`` and ``probe_batch_size`` (dino:
    images per process and step; precomputed: features per step over all processes) default to the
    protocol's. With ``output`` (and the cls feature of a checkpoint) the
    backbone and the probe are saved as one XCiT classifier, usable by ``xcit eval`` / ``predict``; it is checked
    before any work: an existing file is refused unless ``overwrite``, and the input ``checkpoint`` itself always
    (replacing the weights being probed would lose them, and the probe does not reproduce them).
    ``data`` defaults to the dataset the checkpoint records (:func:`xcit.dino.knn.evaluation_data`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"expected protocol in {PROTOCOLS}, got {protocol!r}")
    if protocol == "dino" and weight_decay:
        raise ValueError("expected no weight decay with protocol dino (DINO applies none); use --protocol precomputed")
    lr = PROTOCOL_DEFAULTS[protocol]["lr"] if lr is None else lr
    probe_batch_size = probe_batch_size or PROTOCOL_DEFAULTS[protocol]["probe_batch_size"]
    if epochs < 1 or probe_batch_size < 1 or batch_size < 1 or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"expected epochs, probe_batch_size, batch_size >= 1 and lr > 0; got {epochs}, "
                         f"{probe_batch_size}, {batch_size}, {lr}")
    check_eval_options(batch_size=batch_size, workers=workers, crop_pct=crop_pct)
    if output is not None:
        if pixels or pool != "cls":
            raise ValueError("expected --pool cls and a checkpoint to save the probe as a classifier (--output)")
        claim_file(output, overwrite=overwrite, inputs=[checkpoint])  # before any work
    source = load_feature_model(checkpoint, pixels=pixels, random_init=random_init, pool=pool, seed=seed)
    data = evaluation_data(source, data)
    crop_pct = default_crop_pct(data) if crop_pct is None else crop_pct
    if output is not None and (source.model.backbone is None or pool != "cls"):
        raise ValueError("expected --pool cls and a checkpoint to save the probe as a classifier (--output)")
    env = dist_utils.setup(device)
    try:
        t0 = time.time()
        if protocol == "precomputed":
            train_f, train_y, test_f, test_y, classes, _ = embed_splits(
                source, data, train_split, test_split, env, batch_size=batch_size, workers=workers, amp=amp,
                crop_pct=crop_pct)
            mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
            head = train_linear((train_f - mean) / std, train_y, len(classes), epochs=epochs,
                                batch_size=probe_batch_size, lr=lr, weight_decay=weight_decay, seed=seed, env=env)
            dim, n_train = int(train_f.shape[1]), len(train_y)
            with torch.no_grad():
                train_acc = topk_hits(head((train_f - mean) / std), train_y)
                counts = (topk_hits(head((test_f - mean) / std), test_y) if len(test_y)
                          else torch.zeros(3, dtype=torch.float64))
        else:
            head, classes, dim, n_train, train_acc, counts = _dino_protocol(
                source, data, train_split, test_split, env, epochs=epochs, lr=lr, probe_batch_size=probe_batch_size,
                batch_size=batch_size, workers=workers, amp=amp, seed=seed, crop_pct=crop_pct)
            mean, std = torch.zeros(dim), torch.ones(dim)
            lr = lr * probe_batch_size * env.world_size / 256
        counts = dist_utils.all_reduce_sum(counts, env)
        saved = None
        if output is not None and env.is_main:
            saved = _save_classifier(source.model.backbone, head, mean, std, classes, source, data, Path(output),
                                     crop_pct)
    finally:
        dist_utils.cleanup(env)
    n = int(counts[2])
    result = {"top1": 100 * float(counts[0]) / n, "top5": 100 * float(counts[1]) / n, "n": n, "n_train": n_train,
              "protocol": protocol, "epochs": epochs, "lr": lr, "crop_pct": crop_pct,
              "pool": pool if not pixels else "pixels",
              "features": source.label, "dim": dim, "data": str(data), "split": test_split,
              "seconds": round(time.time() - t0, 1)}
    if train_acc is not None:
        result["train_top1"] = 100 * float(train_acc[0] / train_acc[2])
    if saved is not None:
        result["output"] = str(saved)
    return result


def _dino_protocol(source, data: str, train_split: str, test_split: str, env: dist_utils.DistEnv, *, epochs: int,
                   lr: float, probe_batch_size: int, batch_size: int, workers: int, amp: str, seed: int,
                   crop_pct: float):
    """(head, classes, feature dim, training images, None (no clean training accuracy: the crops are
    augmented), test hit counts of this process)."""
    dataset, size, mean, std = feature_dataset(source, data, train_split)
    aug = dict(mean=mean, std=std, crop="random-resized", crop_scale_min=0.08, hflip=0.5, interpolation="bilinear")
    if isinstance(dataset, TensorImageDataset):
        tf = BatchTrainTransform(size, auto_augment=None, reprob=0.0, **aug)
    else:
        dataset.transform = folder_train_transform(size, auto_augment=None, reprob=0.0, **aug)
        tf = None
    torch.manual_seed(seed)
    sampler = RepeatAugSampler(len(dataset), num_replicas=env.world_size, rank=env.rank, seed=seed)
    loader = build_loader(dataset, sampler, probe_batch_size, batch_transform=tf, workers=workers,
                          pin_memory=env.device.type == "cuda")
    test_loader, test_set = eval_loader(source, data, test_split, env, batch_size, workers, classes=list(dataset.classes),
                                        crop_pct=crop_pct)
    if len(test_set.classes) != len(dataset.classes):
        raise DataError(f"{test_split} has {len(test_set.classes)} classes, {train_split} {len(dataset.classes)}")
    model = source.model.to(env.device).eval()
    amp_dtype = resolve_amp(amp, env.device)
    with torch.no_grad():
        probe = next(iter(test_loader))[0][:1].to(env.device)
        dim = int(model(probe).shape[1])
    scaled = lr * probe_batch_size * env.world_size / 256  # DINO's linear scaling rule
    head = train_linear_augmented(model, loader, sampler, dim, len(dataset.classes), epochs=epochs, lr=scaled, env=env,
                                  amp_dtype=amp_dtype)
    test_f, test_y = extract_features(model, test_loader, env, amp_dtype=amp_dtype)
    with torch.no_grad():
        counts = topk_hits(head(test_f), test_y) if len(test_y) else torch.zeros(3, dtype=torch.float64)
    return head, list(dataset.classes), dim, len(dataset), None, counts


def _save_classifier(backbone: XCiT, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor, classes: list[str],
                     source, data: str, path: Path, crop_pct: float = 1.0) -> Path:
    import copy

    model = copy.deepcopy(backbone).cpu()
    model.reset_classifier(len(classes))
    with torch.no_grad():  # head((f - mean) / std) = (W / std) f + (b - W mean / std)
        model.head.weight.copy_(head.weight / std)
        model.head.bias.copy_(head.bias - (head.weight * (mean / std)).sum(1))
    info = {"img_size": source.img_size, "in_chans": source.in_chans, "mean": list(source.mean or ()),
            "std": list(source.std or ()), "crop_pct": crop_pct, "interpolation": "bicubic", "dataset": str(data)}
    return save_checkpoint(model, path, extra={"classes": classes, "data": info, "linear_probe": {"source": source.label}})
