"""Training and evaluation transforms.

Folder datasets are transformed per image (PIL in, normalised tensor out) inside loader workers,
with timm's ImageNet pipeline: RandomResizedCrop, flip, RandAugment (``rand-m9-mstd0.5-inc1``),
random erasing (``pixel`` mode), exactly the DeiT/XCiT recipe. In-memory datasets are transformed a
batch at a time on uint8 tensors (:class:`BatchTrainTransform`, :class:`BatchEvalTransform`),
which is what makes 28x28 training fast; the same options mean the same thing for both.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from .images import eval_transform

CROPS = ("random-resized", "pad", "none")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # the resize interpolations of every pipeline here


def _interp(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return v2.InterpolationMode[name.upper()]


def _check_auto_augment(auto_augment: str | None) -> None:
    if auto_augment and not auto_augment.startswith("rand"):
        raise ValueError(f"auto_augment must be a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', got {auto_augment!r}")


def rand_augment(auto_augment: str, img_size: int, mean: Sequence[float], interpolation: str = "bicubic") -> Callable:
    """timm's RandAugment for PIL images, with DeiT's hyper-parameters (translate 45% of the size)."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    fill = tuple(min(255, round(255 * m)) for m in mean)
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=fill if len(fill) > 1 else fill[0],
                   interpolation=str_to_pil_interp(interpolation))
    return rand_augment_transform(auto_augment, hparams)


def folder_train_transform(
    img_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop: str = "random-resized",
    crop_scale_min: float = 0.08,
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    interpolation: str = "bicubic",
) -> Callable:
    """The per-image training pipeline for class folders (timm's, as the official recipe)."""
    from timm.data import create_transform

    _check_auto_augment(auto_augment)
    if crop == "pad":
        raise ValueError("crop 'pad' is for small in-memory datasets; use random-resized or none for image folders")
    if crop == "none":
        if auto_augment or reprob:
            raise ValueError("crop 'none' for image folders means no augmentation: also set auto_augment none and reprob 0")
        return create_transform(img_size, is_training=True, no_aug=True, interpolation=interpolation, mean=mean, std=std)
    return create_transform(
        img_size, is_training=True, scale=(crop_scale_min, 1.0), hflip=hflip, color_jitter=None,
        auto_augment=auto_augment or None, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
        re_prob=reprob, re_mode="pixel", re_count=1,
    )


def folder_eval_transform(img_size: int | Sequence[int], *, crop_pct: float, mean: Sequence[float],
                          std: Sequence[float], interpolation: str = "bicubic") -> v2.Compose:
    """The official evaluation pipeline (:func:`~xcit.data.eval_transform`: resize the short side to size / crop_pct,
    centre crop, normalise), with another resize ``interpolation`` than the official bicubic when asked."""
    pipeline = eval_transform(img_size, crop_pct, mean, std)
    if interpolation == "bicubic":
        return pipeline
    mode = _interp(interpolation)
    return v2.Compose([v2.Resize(t.size, interpolation=mode, antialias=True) if isinstance(t, v2.Resize) else t
                       for t in pipeline.transforms])


class BatchTrainTransform:
    """Augment a uint8 batch (B, C, H, W) into a normalised float batch (B, C, S, S).

    Order: RandAugment (per image, timm, optional) -> crop (``random-resized`` per image,
    ``pad``: pad by ``padding`` and crop back at a random offset, batched; ``none``) and resize to
    ``img_size`` -> horizontal flip -> normalise -> random erasing (timm, ``pixel`` mode).
    """

    def __init__(
        self,
        img_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        crop: str = "pad",
        padding: int = 2,
        crop_scale_min: float = 0.08,
        hflip: float = 0.5,
        auto_augment: str | None = None,
        reprob: float = 0.0,
        interpolation: str = "bicubic",
    ) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        _check_auto_augment(auto_augment)
        self.img_size, self.crop, self.padding, self.hflip = img_size, crop, padding, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.interpolation = _interp(interpolation)
        self.rrc = v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), interpolation=self.interpolation,
                                        antialias=True) if crop == "random-resized" else None
        self.randaug = rand_augment(auto_augment, img_size, mean, interpolation) if auto_augment else None
        self.erasing = None
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(reprob, mode="pixel", device="cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.randaug is not None:
            x = torch.stack([_from_pil(self.randaug(_to_pil(img))) for img in x])
        if self.rrc is not None:
            x = torch.stack([self.rrc(img) for img in x])
        else:
            x = _resize(x, self.img_size, self.interpolation)
            if self.crop == "pad" and self.padding > 0:
                x = random_shift(x, self.padding)
        if self.hflip > 0:
            flip = torch.rand(x.shape[0]) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = (x.float().div_(255) - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)
        return x


class BatchEvalTransform:
    """The evaluation pipeline for a uint8 batch: resize to size / crop_pct, centre crop, normalise."""

    def __init__(self, img_size: int, *, crop_pct: float, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic") -> None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.img_size = img_size
        self.resize_to = math.floor(img_size / crop_pct)
        self.interpolation = _interp(interpolation)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x, self.resize_to, self.interpolation)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = v2.functional.center_crop(x, [self.img_size, self.img_size])
        return (x.float().div_(255) - self.mean) / self.std


def random_shift(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad a batch by ``padding`` and crop each image back at its own random offset."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,))
    ox = torch.randint(0, 2 * padding + 1, (b,))
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def _resize(x: torch.Tensor, size: int, mode: v2.InterpolationMode) -> torch.Tensor:
    """Resize the short side of a uint8 batch to ``size`` (no-op when it already is)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    return v2.functional.resize(x, [size], interpolation=mode, antialias=True)


def _to_pil(img: torch.Tensor):
    return v2.functional.to_pil_image(img)


def _from_pil(img) -> torch.Tensor:
    return v2.functional.pil_to_tensor(img)
