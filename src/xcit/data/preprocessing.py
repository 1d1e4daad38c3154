"""A model's evaluation preprocessing, resolved in one place, and the ready transform built from it.

:func:`resolve_data_config` answers "how must images be prepared for this model?" for a model created by
:func:`xcit.create_model`, a checkpoint file or a model name, as timm's ``resolve_data_config`` does;
:func:`create_transform` (or :meth:`DataConfig.transform`, as torchvision's ``weights.transforms()``) returns
the transform itself. What is not recorded falls back to the official evaluation: ImageNet mean / std (their
average for grey models), the name's resolution (224 otherwise), crop ratio 1.0, bicubic.

Checkpoints written by ``xcit train``, ``xcit dino`` (``teacher.pth``), ``xcit linear --output`` and
:func:`xcit.save_checkpoint` carry this as their ``data`` entry (:meth:`DataConfig.to_dict`);
:func:`xcit.create_model` keeps a checkpoint's entry on the model as ``model.data_config``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from ..models.registry import named_resolution
from ..models.weights import TASK_FORMATS, CheckpointError, inspect_checkpoint, read_metadata
from .images import IMAGENET_MEAN, IMAGENET_STD, to_8bit
from .transforms import INTERPOLATIONS, BatchEvalTransform, folder_eval_transform

#: Normalisation of grey (1-channel) models that record none: the average of ImageNet's channel statistics.
GREY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GREY_STD = (sum(IMAGENET_STD) / 3,)


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model at evaluation: convert to ``in_chans`` channels, resize the short side
    to ``size / crop_pct`` (``interpolation``), centre-crop ``img_size`` (H, W), scale to 0..1, normalise."""

    in_chans: int = 3
    img_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.in_chans, bool) or not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"expected in_chans a positive integer, got {self.in_chans!r}")
        object.__setattr__(self, "img_size", _size_pair(self.img_size))
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (int, float)):
                values = (values,)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(f"expected {name} a list of numbers, got {values!r}") from None
            if len(values) != self.in_chans:
                raise ValueError(f"expected {self.in_chans} {name} value(s) for a {self.in_chans}-channel model, "
                                 f"got {list(values)}")
            if name == "std" and not all(v > 0 for v in values):
                raise ValueError(f"expected positive std values, got {list(values)}")
            object.__setattr__(self, name, values)
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"expected crop_pct in (0, 1], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        interpolation = str(self.interpolation).lower()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"expected interpolation one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "interpolation", interpolation)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image (timm's ``input_size``)."""
        return (self.in_chans, *self.img_size)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``data`` entry (plain values; a square size as one int, as ``xcit train`` writes it)."""
        h, w = self.img_size
        return {"img_size": h if h == w else [h, w], "in_chans": self.in_chans, "mean": list(self.mean),
                "std": list(self.std), "crop_pct": self.crop_pct, "interpolation": self.interpolation}

    def transform(self) -> Callable:
        """The ready evaluation transform: a PIL image, a numpy (H, W[, C]) array or an image tensor
        ((C, H, W) or a batch (B, C, H, W), uint8, or float in 0..1) of any size and channel count ->
        a normalised float tensor (in_chans, H, W) (or (B, in_chans, H, W)).

        Colour becomes grey with ITU-R 601 luma, exactly as PIL's ``convert("L")``, grey is repeated
        into RGB, alpha is dropped; then :func:`~xcit.data.folder_eval_transform` (resize, crop, normalise).
        """
        steps = folder_eval_transform(self.img_size, crop_pct=self.crop_pct, mean=self.mean, std=self.std,
                                      interpolation=self.interpolation).transforms
        return v2.Compose([ToChannels(self.in_chans), *steps, v2.ToPureTensor()])

    def batch_transform(self) -> BatchEvalTransform:
        """The same preprocessing for uint8 batches already at the model's channel count (in-memory datasets)."""
        h, w = self.img_size
        if h != w:
            raise ValueError(f"batches are evaluated at square sizes; this model's is {h}x{w}")
        return BatchEvalTransform(h, crop_pct=self.crop_pct, mean=self.mean, std=self.std,
                                  interpolation=self.interpolation)


#: What the preprocessing can be resolved from (see :func:`resolve_data_config`).
Source = nn.Module | str | os.PathLike | Mapping | DataConfig | None


def resolve_data_config(
    source: Source = None,
    *,
    in_chans: int | None = None,
    img_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> DataConfig:
    """The evaluation preprocessing of ``source``, with any keyword given overriding it.

    ``source`` is a model (its ``in_chans`` and the ``data_config`` :func:`xcit.create_model` recorded), a
    checkpoint file (its ``data`` entry, read without loading the weights), a model name (``xcit_small_12_p16``,
    ``xcit_small_12_p16_384.fb_dist_in1k``, ``hf-hub:timm/...``, ``dino_...``: the official evaluation at the
    name's resolution), a ``data`` dict, a :class:`DataConfig`, or None (the ImageNet defaults). Raises
    ``ValueError`` (:class:`~xcit.models.weights.CheckpointError` for files) naming what was expected.
    """
    known, where = _known(source)
    given = {"in_chans": in_chans, "img_size": img_size, "mean": mean, "std": std, "crop_pct": crop_pct,
             "interpolation": interpolation}
    try:
        return _config({**known, **{k: v for k, v in given.items() if v is not None}})
    except ValueError:
        if where:  # the file's own entry, or what was asked of it?
            try:
                _config(known)
            except ValueError as err:
                raise CheckpointError(f"{where}: its preprocessing ('data' entry) is invalid: {err}") from None
        raise


def _config(values: dict[str, Any]) -> DataConfig:
    """A :class:`DataConfig` of ``values``, the mean / std for its channels filled in when not given."""
    chans = values.get("in_chans", 3)
    if "mean" not in values or "std" not in values:
        grey = isinstance(chans, int) and chans != 3
        values = {"mean": GREY_MEAN * chans if grey else IMAGENET_MEAN,
                  "std": GREY_STD * chans if grey else IMAGENET_STD, **values}
    return DataConfig(**values)


def create_transform(source: Source = None, **overrides: Any) -> Callable:
    """The ready evaluation transform of ``source`` (:func:`resolve_data_config`, then :meth:`DataConfig.transform`):
    PIL image or image tensor of any size and channels in, normalised float tensor for the model out."""
    return resolve_data_config(source, **overrides).transform()


class ToChannels:
    """Bring a PIL image, numpy array or image tensor to ``in_chans`` channels (1: grey, 3: RGB; others must match).

    Tensors and arrays are converted like PIL converts images: grey = (19595 R + 38470 G + 7471 B + 2^15) >> 16
    on uint8 (0.299 R + 0.587 G + 0.114 B on floats); grey to RGB repeats it; alpha is dropped. PIL images are
    first brought to 8 bits (16-bit grey scaled by its depth, as :func:`xcit.data.load_image` does).
    """

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return self._pil(img)
        if isinstance(img, np.ndarray):  # (H, W) or (H, W, C), as torchvision reads arrays; copied (may be read-only)
            img = torch.from_numpy(np.array(img[None] if img.ndim == 2 else img.transpose(2, 0, 1)))
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"expected a PIL image, a numpy array or an image tensor, got {type(img).__name__}")
        if img.ndim == 2:
            img = img[None]
        if img.ndim < 3 or img.shape[-3] < 1:
            raise ValueError(f"expected an image tensor (C, H, W) or a batch (B, C, H, W), "
                             f"got shape {tuple(img.shape)}")
        return self._tensor(img)

    def _pil(self, img: Image.Image) -> Image.Image:
        if self.in_chans in (1, 3):
            return to_8bit(img).convert("L" if self.in_chans == 1 else "RGB")
        if len(img.getbands()) == self.in_chans:
            return img
        raise ValueError(f"a {self.in_chans}-channel model takes images of {self.in_chans} channels, "
                         f"got a PIL image of mode {img.mode}")

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.in_chans:
            return x
        if self.in_chans == 1 and c in (3, 4):
            r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
            if x.dtype == torch.uint8:
                grey = (r.int() * 19595 + g.int() * 38470 + b.int() * 7471 + 32768) >> 16
                return grey.to(torch.uint8)
            return r * 0.299 + g * 0.587 + b * 0.114
        if self.in_chans == 1 and c == 2:  # grey + alpha
            return x[..., :1, :, :]
        if self.in_chans == 3 and c in (1, 2):
            return x[..., :1, :, :].expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
        if self.in_chans == 3 and c == 4:
            return x[..., :3, :, :]
        raise ValueError(f"a {self.in_chans}-channel model takes images of {self.in_chans} channels "
                         f"(or 1, 3 or 4 for grey and RGB models), got {c}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


def _known(source: Source) -> tuple[dict[str, Any], str]:
    """(what ``source`` records of its preprocessing, the file it came from or "")."""
    if source is None:
        return {}, ""
    if isinstance(source, DataConfig):
        return {f.name: getattr(source, f.name) for f in fields(source)}, ""
    if isinstance(source, Mapping):
        return _entries(source), ""
    if isinstance(source, nn.Module):
        recorded = getattr(source, "data_config", None)
        known = _entries(recorded) if isinstance(recorded, Mapping) else {}
        chans = getattr(source, "in_chans", None)
        return ({**known, "in_chans": chans} if isinstance(chans, int) else known), ""
    if isinstance(source, (str, os.PathLike)):
        if Path(source).is_file():
            return _from_checkpoint(Path(source)), os.fspath(source)
        if isinstance(source, str):
            size = named_resolution(source)
            if size is not None:
                return {"img_size": size}, ""
        raise ValueError(f"expected a model, a checkpoint file, a model name (see xcit.list_models()) or a DataConfig, "
                         f"got {os.fspath(source)!r}: no such file, and not a model name")
    raise TypeError(f"expected a model, a checkpoint path, a model name, a data dict or a DataConfig, "
                    f"got {type(source).__name__}")


def _from_checkpoint(path: Path) -> dict[str, Any]:
    meta = read_metadata(path)
    task = TASK_FORMATS.get(meta.get("format"))
    if task is not None:
        raise CheckpointError(f"{path}: a {task} checkpoint, not a classifier: its preprocessing is part of its own "
                              f"configuration (use `xcit {task} predict`)")
    data = meta.get("data")
    known = _entries(data) if isinstance(data, Mapping) else {}
    if "in_chans" not in known:
        arch = meta.get("arch") if isinstance(meta.get("arch"), Mapping) else {}
        chans = arch.get("in_chans") or inspect_checkpoint(path).get("in_chans")
        if chans:
            known["in_chans"] = int(chans)
    return known


def _entries(data: Mapping) -> dict[str, Any]:
    """The preprocessing entries of a ``data`` dict (others, such as ``dataset``, are not preprocessing);
    ``None`` and empty values count as not recorded."""
    names = {f.name for f in fields(DataConfig)}
    return {k: v for k, v in data.items() if k in names and v is not None and v != [] and v != ()}


def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) in (1, 2) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in size):
        pair = (size[0], size[-1])
    else:
        raise ValueError(f"expected an image size as an int or [H, W], got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"expected a positive image size, got {size!r}")
    return pair

