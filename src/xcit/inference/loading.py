"""Load a classifier for inference with what it needs beside its weights: class names and preprocessing.

Training checkpoints (``save_checkpoint(model, path, extra={...})``) carry ``classes`` and ``data``
(``img_size``, ``in_chans``, ``mean``, ``std``, ``crop_pct``, ``dataset``). Files without them (official
release weights, bare state dicts) fall back to ImageNet class names for 1000-class heads and to the
ImageNet evaluation preprocessing (224 px, full crop, ImageNet mean/std).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.images import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ..models.weights import read_metadata

PathLike = str | os.PathLike

#: Preprocessing of grey (1-channel) models without metadata: the mean of ImageNet's channel statistics.
GREY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GREY_STD = (sum(IMAGENET_STD) / 3,)

RANDOM_INIT_WARNING = (
    "WARNING: no --checkpoint given: {name} is randomly initialised and its predictions are meaningless "
    "(use it only to try the pipeline)"
)


@dataclass
class InferenceModel:
    """A classifier in eval mode with its class names and evaluation preprocessing."""

    model: nn.Module
    classes: list[str]
    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    source: str = ""
    random_init: bool = False
    dataset: str | None = None
    metadata: dict = field(default_factory=dict, repr=False)

    def transform(self):
        """The evaluation transform: PIL image -> normalised (in_chans, H, W) float tensor."""
        if self.interpolation == "bicubic":
            return eval_transform(self.img_size, self.crop_pct, self.mean, self.std)
        from torchvision.transforms import v2

        steps = list(eval_transform(self.img_size, self.crop_pct, self.mean, self.std).transforms)
        resize = next(i for i, t in enumerate(steps) if isinstance(t, v2.Resize))
        steps[resize] = v2.Resize(steps[resize].size, interpolation=_interpolation(self.interpolation), antialias=True)
        return v2.Compose(steps)

    def calibration_images(self, data, n: int, *, split: str = "train", seed: int = 0) -> torch.Tensor:
        """``n`` images of ``data`` (a dataset name or folder) preprocessed as this model's inputs, for
        :func:`xcit.quantize` (:func:`xcit.data.calibration_images`)."""
        from ..data import BatchEvalTransform, calibration_images

        h, w = self.img_size

        def batch_transform(images: torch.Tensor) -> torch.Tensor:
            if h != w:
                raise ValueError(f"in-memory datasets are evaluated at square sizes; the model's is {h}x{w}")
            return BatchEvalTransform(h, crop_pct=self.crop_pct, mean=self.mean, std=self.std,
                                      interpolation=self.interpolation)(images)

        return calibration_images(data, n, in_chans=self.in_chans, batch_transform=batch_transform,
                                  image_transform=self.transform(), split=split, seed=seed)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sidecar(self) -> dict:
        """What a program without this package needs to preprocess inputs and name outputs (JSON-able)."""
        return {
            "source": self.source, "img_size": list(self.img_size), "in_chans": self.in_chans,
            "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
            "interpolation": self.interpolation, "classes": list(self.classes), "dataset": self.dataset,
            "random_init": self.random_init,
        }


def _interpolation(name: str):
    from torchvision.transforms import v2

    try:
        return v2.InterpolationMode[name.upper()]
    except KeyError:
        raise ValueError(f"expected interpolation bicubic, bilinear or nearest, got {name!r}") from None


def class_names(num_classes: int, meta: dict | None = None) -> list[str]:
    """Class names: the checkpoint's, ImageNet's for 1000 classes, else ``class_0``..``class_{n-1}``."""
    classes = (meta or {}).get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    if classes is not None:
        warnings.warn(
            f"checkpoint lists {len(classes) if isinstance(classes, (list, tuple)) else '?'} class names "
            f"for a {num_classes}-class head; using generic names", stacklevel=2,
        )
    if num_classes == 1000:
        from ..data.images import imagenet_class_names

        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]


def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) in (1, 2) and all(isinstance(s, int) for s in size):
        pair = (size[0], size[-1])
    else:
        raise ValueError(f"expected an image size as an int or [H, W], got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"expected a positive image size, got {size!r}")
    return pair


def load_for_inference(
    checkpoint: PathLike | None = None,
    model_name: str | None = None,
    *,
    img_size: int | Sequence[int] | None = None,
    crop_pct: float | None = None,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> InferenceModel:
    """Build a classifier from ``checkpoint`` (architecture read from the file) and/or ``model_name``.

    Without a checkpoint, ``model_name`` gives a *randomly initialised* model (``random_init=True``),
    useful only to try the pipeline. ``img_size`` / ``crop_pct`` override the checkpoint's values.
    """
    from ..models import create_model, resolve_name

    if checkpoint is None and model_name is None:
        raise ValueError("expected a checkpoint or a model name (e.g. --model xcit_nano_12_p16), got neither")
    meta: dict = {}
    default_size = 224
    if model_name is not None:
        default_size = resolve_name(model_name).img_size
    if checkpoint is not None:
        from ..models.hub import weights_file

        checkpoint = weights_file(checkpoint)  # a path, or a hub / DINO / release name
        meta = read_metadata(checkpoint)
        model = create_model(model_name, checkpoint=checkpoint)
        source = os.fspath(checkpoint)
    else:
        model = create_model(model_name, num_classes=num_classes if num_classes is not None else 1000)
        source = f"{resolve_name(model_name).arch} (random init)"
    model.eval().to(device)
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    in_chans = int(getattr(model, "in_chans", data.get("in_chans", 3)))
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GREY_MEAN * in_chans, GREY_STD * in_chans)
    mean = tuple(float(m) for m in data.get("mean", default_mean))
    std = tuple(float(s) for s in data.get("std", default_std))
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"expected {in_chans} mean/std values for a {in_chans}-channel model, got mean={mean} std={std}")
    size = _size_pair(img_size if img_size is not None else data.get("img_size", default_size))
    crop = float(crop_pct if crop_pct is not None else data.get("crop_pct", 1.0))
    if not 0.0 < crop <= 1.0:
        raise ValueError(f"expected crop_pct in (0, 1], got {crop}")
    interpolation = str(data.get("interpolation", "bicubic")).lower()
    _interpolation(interpolation)
    n = getattr(model, "num_classes", 0)
    if not n:
        raise ValueError(f"{source}: the model has no classifier head (num_classes=0); nothing to predict")
    return InferenceModel(
        model=model, classes=class_names(n, meta), img_size=size, in_chans=in_chans, mean=mean, std=std,
        crop_pct=crop, interpolation=interpolation, source=source, random_init=checkpoint is None, dataset=data.get("dataset"), metadata=meta,
    )
