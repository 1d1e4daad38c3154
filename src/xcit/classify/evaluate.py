"""Classification evaluation: top-1 / top-5 of a model over a loader (:func:`evaluate_model`, also the training
run's) and of a saved checkpoint on a dataset with the official preprocessing (:func:`evaluate`, ``xcit eval``)."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataError, TensorImageDataset, build_dataset, dataset_kind
from ..data.loader import ShardSampler, build_loader
from ..data.transforms import BatchEvalTransform, folder_eval_transform
from ..train import distributed as dist_utils
from ..train.metrics import progress_bar
from ..train.run import autocast_context, resolve_amp

log = logging.getLogger("xcit.train")
#: ``amp`` with ``int8``: what runs between the int8 products (None: bf16 where the CPU has bf16 instructions).
INT8_FLOAT_DTYPES: dict[str, torch.dtype | None] = {"none": torch.float32, "bf16": torch.bfloat16, "auto": None}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    env: dist_utils.DistEnv | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1, top-5 (%) and mean cross-entropy of ``model`` over ``loader``, summed over all processes."""
    env = env or dist_utils.DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top-1, top-5, images, skipped
    bar = progress_bar(len(loader), desc, progress and env.is_main)
    for images, targets, skipped in loader:
        totals[4] += len(skipped)
        bar.update(1)
        if len(images) == 0:
            continue
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with autocast_context(env.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        totals[0] += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals[1] += hits[:, 0].sum().item()
        totals[2] += hits.any(dim=1).sum().item()
        totals[3] += len(targets)
    bar.close()
    model.train(was_training)
    totals = dist_utils.all_reduce_sum(totals, env)
    n = int(totals[3])
    if n == 0:
        raise DataError("no evaluation image could be read")
    return {"top1": 100.0 * float(totals[1]) / n, "top5": 100.0 * float(totals[2]) / n,
            "loss": float(totals[0]) / n, "n": n, "skipped": int(totals[4])}


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The plain entries saved beside the weights of a model file (``classes``, ``data``, ``metrics``...)."""
    from ..models.weights import read_metadata

    return read_metadata(path)


def evaluate(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    split: str = "val",
    *,
    model_name: str | None = None,
    batch_size: int = 256,
    img_size: int | None = None,
    crop_pct: float | None = None,
    in_chans: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    workers: int = 4,
    amp: str = "none",
    progress: bool = True,
    int8: bool = False,
    calibration_images: int = 512,
    calibration_split: str = "train",
) -> dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint on a dataset, with the official evaluation preprocessing.

    With ``int8`` the model is first quantised (:func:`xcit.quantize`, CPU, one process) on
    ``calibration_images`` images drawn from ``calibration_split`` of the same data; ``amp`` then says
    what runs between the int8 products: ``"none"`` float32, ``"bf16"`` bfloat16, ``"auto"`` bfloat16
    where the CPU has bf16 instructions, else float32 (``quantize``'s default).

    ``data`` defaults to the dataset the checkpoint records it was trained on (``xcit train``,
    ``xcit dino`` and the linear probe write it); a checkpoint that records none needs it given.
    Preprocessing defaults come from the checkpoint's saved ``data`` entry, else the ImageNet ones
    (crop ratio 1.0, bicubic). Runs data-parallel under torchrun.
    """
    from ..models import create_model, resolve_name

    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"expected img_size >= 1, got {img_size!r}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f"expected crop_pct in (0, 1], got {crop_pct!r}")
    if int8 and (device not in ("auto", "cpu") or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ValueError("int8 evaluation runs in one CPU process: use --device cpu (or auto) and no torchrun")
    if int8 and amp not in INT8_FLOAT_DTYPES:
        raise ValueError(f"with int8, --amp chooses what runs between the int8 products: expected one of "
                         f"{', '.join(INT8_FLOAT_DTYPES)}, got {amp!r}")
    meta = read_model_metadata(checkpoint)
    saved = meta.get("data", {}) if isinstance(meta.get("data"), dict) else {}
    if data is None:
        data = saved.get("dataset")
        if not data:
            raise ValueError(f"expected --data (the images to evaluate on): {os.fspath(checkpoint)} does not record "
                             "the dataset it was trained on")
    kind = dataset_kind(data)
    default_size = resolve_name(model_name).img_size if model_name else 224
    chans = in_chans or saved.get("in_chans") or (1 if kind in ("fashion-mnist", "digits", "idx") else 3)
    classes = meta.get("classes")
    try:
        dataset = build_dataset(data, split, in_chans=chans, classes=classes if kind == "folder" else None)
    except DataError:
        if kind != "folder" or not classes:
            raise
        dataset = build_dataset(data, split, in_chans=chans)
        if len(dataset.classes) != len(classes):
            raise
        log.warning("class folders differ from the checkpoint's class names; assuming the same (sorted) order")
    if isinstance(dataset, TensorImageDataset) and dataset.in_chans != chans:
        raise DataError(f"{data} has {dataset.in_chans}-channel images, the model takes {chans}")
    native = dataset.native_size if isinstance(dataset, TensorImageDataset) else default_size
    size = img_size if img_size is not None else saved.get("img_size") or native
    pct = crop_pct if crop_pct is not None else saved.get("crop_pct", 1.0)
    norm_mean = tuple(mean or saved.get("mean") or dataset.mean)
    norm_std = tuple(std or saved.get("std") or dataset.std)
    interp = interpolation or saved.get("interpolation", "bicubic")
    env = dist_utils.setup("cpu" if int8 else device)
    try:
        model = create_model(model_name, checkpoint=checkpoint, in_chans=chans).to(env.device)
        n_out = model.num_classes
        if classes and isinstance(dataset, TensorImageDataset) and list(classes) != list(dataset.classes):
            if len(classes) != len(dataset.classes):
                raise DataError(f"the model predicts {len(classes)} classes, {data} has {len(dataset.classes)}")
            log.warning("the checkpoint's class names differ from %s's; comparing labels by index", data)
        if n_out < len(dataset.classes):
            raise DataError(f"the model predicts {n_out} classes, {data} has {len(dataset.classes)}")
        if isinstance(dataset, TensorImageDataset):
            tf = BatchEvalTransform(size, crop_pct=pct, mean=norm_mean, std=norm_std, interpolation=interp)
        else:
            dataset.transform = folder_eval_transform(size, crop_pct=pct, mean=norm_mean, std=norm_std,
                                                      interpolation=interp)
            tf = None
        if int8:
            model = _quantized(model, data, calibration_images, calibration_split, batch_size, chans, size, pct, norm_mean,
                               norm_std, interp, INT8_FLOAT_DTYPES[amp])
        loader = build_loader(dataset, ShardSampler(len(dataset), num_replicas=env.world_size, rank=env.rank),
                              batch_size, batch_transform=tf, workers=workers, pin_memory=env.device.type == "cuda")
        amp_dtype = None if int8 else resolve_amp(amp, env.device)  # the int8 model runs its own precision
        metrics = evaluate_model(model, loader, env, amp_dtype=amp_dtype, progress=progress,
                                 desc=f"eval {split}")
    finally:
        dist_utils.cleanup(env)
    extra = {"int8": {"calibration_images": model.calibration_images, "calibration_split": calibration_split,
                      "between_products": str(model.float_dtype).replace("torch.", "")}} if int8 else {}
    return {**metrics, "img_size": size, "crop_pct": pct, "data": str(data), "split": split,
            "checkpoint": str(checkpoint), **extra}


def _quantized(model: nn.Module, data, n: int, split: str, batch_size: int, in_chans: int, size: int, pct: float,
               mean: tuple, std: tuple, interpolation: str, float_dtype: torch.dtype | None) -> nn.Module:
    """``model`` quantised to int8 on ``n`` images of ``data``'s ``split`` (evaluation preprocessing)."""
    from ..data.calibration import calibration_images
    from ..models import quantize

    images = calibration_images(
        data, n, in_chans=in_chans, split=split,
        batch_transform=BatchEvalTransform(size, crop_pct=pct, mean=mean, std=std, interpolation=interpolation),
        image_transform=folder_eval_transform(size, crop_pct=pct, mean=mean, std=std, interpolation=interpolation),
    )
    log.info("int8: calibrating on %d images of %s (%s), %dpx", len(images), data, split, size)
    return quantize(model.eval(), images, batch_size=batch_size, float_dtype=float_dtype)
