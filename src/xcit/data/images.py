"""Image loading and the official evaluation preprocessing."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | os.PathLike, in_chans: int = 3) -> Image.Image:
    """Open an image as RGB (``in_chans=3``) or greyscale (``in_chans=1``); ValueError if unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err


def eval_transform(
    img_size: int | Sequence[int] = 224,
    crop_pct: float = 1.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The official evaluation pipeline: bicubic resize of the short side to size / crop_pct, centre crop.

    ``crop_pct=1.0`` is the paper's "full crop". Returns a float tensor normalised by ``mean``/``std``.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    resize = math.floor(min(size) / crop_pct) if size[0] == size[1] else tuple(math.floor(s / crop_pct) for s in size)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (from torchvision's bundled metadata, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
