"""Image files: which names are images, listing them, reading them, and the official evaluation preprocessing.

The one reader of every task (classification, attention, segmentation, detection) is
:func:`load_image` (a PIL image) and :func:`read_image` (its uint8 tensor); deeper than 8-bit
images are scaled by their bit depth (:func:`to_8bit`) everywhere.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# file name endings (lower case) taken for images when folders are searched
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike, *, recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders when ``recursive``), sorted by path."""
    folder = Path(folder)
    entries = folder.rglob("*") if recursive else folder.iterdir()
    ends = tuple(e.lower() for e in extensions)
    return sorted(f for f in entries if f.name.lower().endswith(ends) and f.is_file())


def collect_images(inputs: Iterable[str | os.PathLike] = (), lists: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Image paths from files, folders (searched recursively for image extensions, sorted) and list files.

    A list file holds one path per line (blank lines and ``#`` comments skipped; ``-`` reads stdin);
    relative paths in it are relative to the current directory. Files named explicitly are kept
    even when missing or not images, so that they are reported as errors rather than dropped.
    """
    paths: list[str] = []
    for item in inputs:
        if Path(item).is_dir():
            paths += [str(f) for f in list_images(item)]
        else:
            paths.append(os.fspath(item))
    for lst in lists:
        if os.fspath(lst) == "-":
            lines = sys.stdin.read().splitlines()
        else:
            if not Path(lst).is_file():
                raise FileNotFoundError(f"list file {os.fspath(lst)!r} does not exist")
            lines = Path(lst).read_text().splitlines()
        paths += [s for line in lines if (s := line.strip()) and not s.startswith("#")]
    return paths


def load_image(path: str | os.PathLike, in_chans: int = 3) -> Image.Image:
    """Open an image as RGB (``in_chans=3``) or greyscale (``in_chans=1``); ValueError if unreadable.

    Greyscale images deeper than 8 bits are scaled to 8 bits first (:func:`to_8bit`).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_8bit(img).convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """uint8 (3, H, W) tensor of an image file (:func:`load_image` as RGB); ValueError if unreadable."""
    return torch.from_numpy(np.array(load_image(path, in_chans=3))).permute(2, 0, 1).contiguous()


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer, or float, greyscale image as 8-bit ``L``, scaled by its bit depth.

    PIL's ``convert`` clips such images to 0..255 instead (a 16-bit PNG turns almost white). The depth
    is the TIFF ``BitsPerSample`` where given, 16 for PNG / PGM ``I`` images (those formats stop at 16
    bits), else 32 (signed: negatives become 0). Float images are read as 0..1, or as 0..255 when their
    maximum is above 1. Other modes are returned unchanged.
    """
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        bits = _int_bits(img)
        top = float((1 << bits) - 1 if bits < 32 else (1 << 31) - 1)
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
    else:
        return img
    values = np.nan_to_num(np.asarray(img, dtype=np.float64)) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _int_bits(img: Image.Image) -> int:
    if hasattr(img, "tag_v2"):  # TIFF
        bits = img.tag_v2.get(258, 32)
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if img.format in ("PNG", "PPM") else 32


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
