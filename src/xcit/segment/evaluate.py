"""Segmentation evaluation: mIoU, per-class IoU and pixel accuracy of a model (:func:`evaluate`, also the training
run's) or of a checkpoint (:func:`evaluate_checkpoint`, ``xcit segment eval``) on an image / mask split."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..train import distributed as dist_utils
from ..train.metrics import progress_bar
from ..train.run import resolve_amp, run_process
from .config import EvalSettings
from .data import SegmentationFolder, infer, split_dirs
from .metrics import ConfusionMatrix
from .model import load_segmenter, normalization


@torch.no_grad()
def evaluate(model, dataset: SegmentationFolder, settings: EvalSettings, ctx: dist_utils.DistEnv | None = None,
             amp_dtype: torch.dtype | None = None, progress: bool = False,
             normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)) -> dict:
    """Confusion-matrix metrics of ``model`` on ``dataset`` (sharded over processes when distributed), its images
    normalised with ``normalization`` (mean, std)."""
    ctx = ctx or dist_utils.DistEnv(device=next(model.parameters()).device)
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    indices = range(ctx.rank, len(dataset), ctx.world_size)
    bar = progress_bar(len(indices), "eval", progress and ctx.is_main)
    for i in indices:
        image, mask = dataset.load(i)
        try:
            probs = infer(net, image, mode=settings.mode, scale=settings.scale, crop_size=settings.crop_size,
                          stride=settings.stride, flip=settings.flip, amp_dtype=amp_dtype, mean=normalization[0],
                          std=normalization[1])
        except ValueError as err:  # an image the model cannot take (too small): name it
            raise ValueError(f"{dataset.samples[i][0]}: {err}") from None
        cm.update(probs.argmax(0), mask)
        bar.update(1)
    bar.close()
    cm.all_reduce()
    net.train(was_training)
    return cm.compute()


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "validation", settings: EvalSettings | None = None,
                        device: str = "auto", amp: str = "none", num_classes: int | None = None,
                        ignore_index: int | None = None, reduce_zero_label: bool | None = None) -> tuple[dict, list[str]]:
    """Metrics of a segmentation checkpoint on ``data``/``split``; returns (metrics, class names)."""
    with run_process(device) as ctx:
        model, meta = load_segmenter(checkpoint, map_location="cpu")
        model.to(ctx.device)
        n = num_classes or model.num_classes
        if n != model.num_classes:
            raise ValueError(f"expected --num-classes {model.num_classes} (the checkpoint's), got {n}")
        ignore = ignore_index if ignore_index is not None else meta.get("ignore_index", 255)
        rzl = reduce_zero_label if reduce_zero_label is not None else meta.get("reduce_zero_label", False)
        images, masks = split_dirs(data, split)
        dataset = SegmentationFolder(images, masks, n, ignore_index=ignore, reduce_zero_label=rzl)
        if settings is None:
            settings = EvalSettings(**meta.get("eval", {}))
        metrics = evaluate(model, dataset, settings, ctx, resolve_amp(amp, ctx.device), progress=True,
                           normalization=normalization(meta))
        classes = meta.get("classes") or [f"class{i}" for i in range(n)]
        return metrics, classes
