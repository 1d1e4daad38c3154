"""bf16 autocast vs fp32: the share of equal top-1 predictions of a trained checkpoint (``xcit bench --bf16-checkpoint``)."""
from __future__ import annotations

import time


def bf16_agreement(checkpoint: str, data: str = "fashion-mnist", split: str = "val", batch_size: int = 256) -> dict:
    """Top-1 predictions of a trained checkpoint in fp32 and under bf16 autocast (the optimised model)."""
    import torch

    from ..data.datasets import TensorImageDataset, build_dataset
    from ..data.loader import ShardSampler, build_loader
    from ..data.transforms import BatchEvalTransform
    from ..models import create_model, optimize
    from ..models.weights import read_metadata as read_model_metadata

    meta = read_model_metadata(checkpoint)
    saved = meta.get("data", {}) if isinstance(meta.get("data"), dict) else {}
    chans = saved.get("in_chans") or 1
    dataset = build_dataset(data, split, in_chans=chans)
    if not isinstance(dataset, TensorImageDataset):
        raise ValueError("the agreement check expects a tensor dataset such as fashion-mnist")
    size = saved.get("img_size") or dataset.native_size
    tf = BatchEvalTransform(size, crop_pct=saved.get("crop_pct", 1.0), mean=tuple(saved.get("mean") or dataset.mean),
                            std=tuple(saved.get("std") or dataset.std), interpolation=saved.get("interpolation", "bicubic"))
    loader = build_loader(dataset, ShardSampler(len(dataset), num_replicas=1, rank=0), batch_size, batch_transform=tf,
                          workers=0)
    model = optimize(create_model(checkpoint=checkpoint, in_chans=chans))
    same = n = correct32 = correct16 = 0
    t32 = t16 = 0.0
    with torch.inference_mode():
        for images, targets, _ in loader:
            t0 = time.perf_counter()
            p32 = model(images).argmax(1)
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                p16 = model(images).float().argmax(1)
            t2 = time.perf_counter()
            t32 += t1 - t0
            t16 += t2 - t1
            same += int((p32 == p16).sum())
            correct32 += int((p32 == targets).sum())
            correct16 += int((p16 == targets).sum())
            n += len(targets)
    return {"checkpoint": str(checkpoint), "n": n, "agreement": same / n, "top1_fp32": correct32 / n,
            "top1_bf16": correct16 / n, "img_size": size, "time_fp32_s": t32, "time_bf16_s": t16}
