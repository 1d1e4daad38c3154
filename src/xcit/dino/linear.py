"""Linear probe: a linear classifier trained on frozen features (standardised with the training
split's statistics), reported as top-1 / top-5 on the test split.

The features are computed once, without augmentation (DINO trains its linear layer through the
frozen network on augmented crops, which costs a forward pass per image and epoch; on a CPU the
precomputed features make the probe take seconds). Under ``torchrun`` the features are embedded
in shards, each process trains on its shard of every batch with gradients averaged over
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

from ..models import XCiT
from ..models.weights import save_checkpoint
from ..train import distributed as dist_utils
from .knn import embed_splits, load_feature_model, topk_hits


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
            if env.distributed:
                grads = torch.cat([p.grad.flatten() for p in head.parameters()]).double()
                grads = dist_utils.all_reduce_sum(grads, env) / env.world_size
                offset = 0
                for p in head.parameters():
                    p.grad.copy_(grads[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            opt.step()
            step += 1
    return head


def linear_probe(checkpoint: str | os.PathLike | None = None, data: str = "fashion-mnist", *, pixels: bool = False,
                 random_init: bool = False, train_split: str = "train", test_split: str = "val", pool: str = "cls",
                 epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0, probe_batch_size: int = 256,
                 batch_size: int = 500, device: str = "auto", workers: int = 4, amp: str = "none", seed: int = 0,
                 output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train a linear classifier on frozen features of the train split; top-1 / top-5 (%) on the test split.

    With ``output`` (and the cls feature of a checkpoint) the backbone and the probe are saved as one
    XCiT classifier, the standardisation folded into the head, usable by ``xcit eval`` / ``predict``.
    """
    source = load_feature_model(checkpoint, pixels=pixels, random_init=random_init, pool=pool, seed=seed)
    if output is not None and (source.model.backbone is None or pool != "cls"):
        raise ValueError("expected --pool cls and a checkpoint to save the probe as a classifier (--output)")
    env = dist_utils.setup(device)
    try:
        train_f, train_y, test_f, test_y, classes, t_embed = embed_splits(
            source, data, train_split, test_split, env, batch_size=batch_size, workers=workers, amp=amp)
        t0 = time.time()
        mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
        head = train_linear((train_f - mean) / std, train_y, len(classes), epochs=epochs, batch_size=probe_batch_size,
                            lr=lr, weight_decay=weight_decay, seed=seed, env=env)
        with torch.no_grad():
            train_acc = topk_hits(head((train_f - mean) / std), train_y)
            counts = topk_hits(head((test_f - mean) / std), test_y) if len(test_y) else torch.zeros(3, dtype=torch.float64)
        counts = dist_utils.all_reduce_sum(counts, env)
        saved = None
        if output is not None and env.is_main:
            saved = _save_classifier(source.model.backbone, head, mean, std, classes, source, data, Path(output))
    finally:
        dist_utils.cleanup(env)
    n = int(counts[2])
    result = {"top1": 100 * float(counts[0]) / n, "top5": 100 * float(counts[1]) / n, "n": n,
              "train_top1": 100 * float(train_acc[0] / train_acc[2]), "n_train": len(train_y), "epochs": epochs,
              "lr": lr, "pool": pool if not pixels else "pixels", "features": source.label, "dim": int(train_f.shape[1]),
              "data": str(data), "split": test_split, "seconds": round(t_embed + time.time() - t0, 1)}
    if saved is not None:
        result["output"] = str(saved)
    return result


def _save_classifier(backbone: XCiT, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor, classes: list[str],
                     source, data: str, path: Path) -> Path:
    import copy

    model = copy.deepcopy(backbone).cpu()
    model.reset_classifier(len(classes))
    with torch.no_grad():  # head((f - mean) / std) = (W / std) f + (b - W mean / std)
        model.head.weight.copy_(head.weight / std)
        model.head.bias.copy_(head.bias - (head.weight * (mean / std)).sum(1))
    info = {"img_size": source.img_size, "in_chans": source.in_chans, "mean": list(source.mean or ()),
            "std": list(source.std or ()), "crop_pct": 1.0, "interpolation": "bicubic", "dataset": str(data)}
    return save_checkpoint(model, path, extra={"classes": classes, "data": info, "linear_probe": {"source": source.label}})
