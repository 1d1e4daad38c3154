"""Load a classifier for inference with what it needs beside its weights: class names and preprocessing.

Training checkpoints (``save_checkpoint(model, path, extra={...})``) carry ``classes`` and ``data``
(``img_size``, ``in_chans``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``dataset``). The preprocessing
is resolved by :func:`xcit.data.resolve_data_config`, the one place that does it: files without it (official
release weights, bare state dicts) get the ImageNet evaluation (224 px or the name's resolution, full crop,
ImageNet mean/std); files without class names get ImageNet's for 1000-class heads.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.preprocessing import DataConfig, resolve_data_config
from ..models.weights import CheckpointError, read_metadata

PathLike = str | os.PathLike

RANDOM_INIT_WARNING = (
    "WARNING: no --checkpoint given: {name} is randomly initialised and its predictions are meaningless "
    "(use it only to try the pipeline)"
)


@dataclass
class InferenceModel:
    """A classifier in eval mode with its class names and evaluation preprocessing (``data_config``)."""

    model: nn.Module
    classes: list[str]
    data_config: DataConfig
    source: str = ""
    random_init: bool = False
    dataset: str | None = None
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.data_config.img_size

    @property
    def in_chans(self) -> int:
        return self.data_config.in_chans

    @property
    def mean(self) -> tuple[float, ...]:
        return self.data_config.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.data_config.std

    @property
    def crop_pct(self) -> float:
        return self.data_config.crop_pct

    @property
    def interpolation(self) -> str:
        return self.data_config.interpolation

    def transform(self):
        """The evaluation transform: PIL image (or image tensor) -> normalised (in_chans, H, W) float tensor."""
        return self.data_config.transform()

    def calibration_images(self, data, n: int, *, split: str = "train", seed: int = 0) -> torch.Tensor:
        """``n`` images of ``data`` (a dataset name or folder) preprocessed as this model's inputs, for
        :func:`xcit.quantize` (:func:`xcit.data.calibration_images`)."""
        from ..data import calibration_images

        def batch_transform(images: torch.Tensor) -> torch.Tensor:
            return self.data_config.batch_transform()(images)

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
    if checkpoint is not None:
        from ..models.hub import weights_file

        path = weights_file(checkpoint)  # a path, or a hub / DINO / release name (whose resolution the model keeps)
        meta = read_metadata(path)
        model = create_model(model_name, checkpoint=checkpoint)
        source = os.fspath(path)
    else:
        model = create_model(model_name, num_classes=num_classes if num_classes is not None else 1000)
        source = f"{resolve_name(model_name).arch} (random init)"
    model.eval().to(device)
    try:
        recorded = resolve_data_config(model)
    except ValueError as err:
        raise CheckpointError(f"{source}: its preprocessing ('data' entry) is invalid: {err}") from None
    data_config = resolve_data_config(recorded, img_size=img_size, crop_pct=crop_pct)
    n = getattr(model, "num_classes", 0)
    if not n:
        raise ValueError(f"{source}: the model has no classifier head (num_classes=0); nothing to predict")
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    return InferenceModel(
        model=model, classes=class_names(n, meta), data_config=data_config, source=source,
        random_init=checkpoint is None, dataset=data.get("dataset"), metadata=meta,
    )
