"""Calibration images for post-training quantisation: a fixed-seed sample, preprocessed like evaluation."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .datasets import NAMED_DATASETS, TensorImageDataset, build_dataset, dataset_kind
from .images import list_images, load_image


def calibration_images(
    data: str | os.PathLike,
    n: int,
    *,
    in_chans: int,
    batch_transform: Callable[[torch.Tensor], torch.Tensor],
    image_transform: Callable,
    split: str = "train",
    seed: int = 0,
) -> torch.Tensor:
    """``n`` images (all of them if the data holds fewer) drawn with a fixed seed, as a float tensor (N, C, H, W).

    ``data``: ``fashion-mnist``, ``digits``, an IDX folder (its ``split``), a folder with ``split/``
    class folders (that split), or any other folder of images (searched recursively). In-memory
    datasets go through ``batch_transform`` (uint8 batch -> normalised floats), image files through
    ``image_transform`` (PIL image -> normalised (C, H, W) tensor): the evaluation preprocessing.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected at least 1 calibration image, got {n!r}")
    key = str(data).strip().lower()
    path = Path(data).expanduser()
    named = key in NAMED_DATASETS or key in ("fmnist", "fashion_mnist", "fashionmnist", "sklearn-digits")
    if named or (path.is_dir() and (dataset_kind(path) == "idx" or (path / split).is_dir())):
        dataset = build_dataset(data, split, in_chans=in_chans)
        if isinstance(dataset, TensorImageDataset):
            images = dataset.images[_subset(len(dataset), n, seed)]
            if dataset.in_chans == 1 and in_chans == 3:
                images = images.expand(-1, 3, -1, -1)  # grey as RGB, as image files are read for a colour model
            elif dataset.in_chans != in_chans:
                raise ValueError(f"the calibration data has {dataset.in_chans}-channel images, the model takes {in_chans}")
            return batch_transform(images)
        files = [file for file, _ in dataset.samples]
    elif path.is_dir():
        files = list_images(path)
    else:
        raise ValueError(f"calibration data {os.fspath(data)!r} is neither a known dataset "
                         f"({', '.join(NAMED_DATASETS)}) nor a folder of images")
    if not files:
        raise ValueError(f"found no images in {os.fspath(data)} to calibrate on")
    return torch.stack([image_transform(load_image(files[i], in_chans)) for i in _subset(len(files), n, seed).tolist()])


def _subset(available: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=g)[:min(n, available)].sort().values
