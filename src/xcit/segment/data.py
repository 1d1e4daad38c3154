"""Image + mask folders (ADE20k layout), training augmentation and test-time resizing.

Layout: ``ROOT/images/SPLIT/NAME.{jpg,png,...}`` and ``ROOT/annotations/SPLIT/NAME.png`` (or
``ROOT/masks/SPLIT``), masks holding class indices (8- or 16-bit grey or palette PNG). An
optional ``ROOT/dataset.yaml`` names the classes, palette, ignore index and zero-label reduction.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from ..config import read_yaml
from ..data.images import (
    IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, display_path, list_images, open_image, read_image,
)

MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")
MASK_DIRS = ("annotations", "masks", "labels")


@dataclass
class DatasetInfo:
    """What ``dataset.yaml`` says about a dataset (all optional there)."""

    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    ignore_index: int = 255
    reduce_zero_label: bool = False
    name: str = ""

    @classmethod
    def load(cls, root: str | os.PathLike) -> DatasetInfo | None:
        """``ROOT/dataset.yaml`` (None when there is none); a one-line ``ValueError`` naming the file and the key
        for a file that is not YAML, repeats a key, or holds a key or value of the wrong kind."""
        path = Path(root) / "dataset.yaml"
        if not path.exists():
            return None
        data = read_yaml(path, "dataset description") or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of {', '.join(cls.__dataclass_fields__)}, "
                             f"got a {type(data).__name__}")
        known = list(cls.__dataclass_fields__)
        unknown = [str(k) for k in data if k not in known]
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {known}")
        for key, value in data.items():
            problem = _INFO_RULES[key][0](value)
            if problem:
                raise ValueError(f"{path}: {key}: expected {_INFO_RULES[key][1]}, got {value!r}")
        if "classes" in data:
            data["classes"] = [str(c) for c in data["classes"]]
        if "name" in data:
            data["name"] = str(data["name"])
        return cls(**data)

    def save(self, root: str | os.PathLike) -> Path:
        path = Path(root) / "dataset.yaml"
        path.write_text(yaml.safe_dump(self.__dict__, sort_keys=False))
        return path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key of dataset.yaml -> (whether a value is wrong, what is expected)
_INFO_RULES = {
    "classes": (lambda v: not (isinstance(v, list) and all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                            for c in v)), "a list of class names"),
    "palette": (lambda v: not (isinstance(v, list) and all(
        isinstance(c, list) and len(c) == 3 and all(_is_int(x) and 0 <= x <= 255 for x in c) for c in v)),
        "a list of [R, G, B] colours (integers 0..255)"),
    "ignore_index": (lambda v: not (_is_int(v) and 0 <= v <= 65535), "an integer 0..65535 (the mask value to ignore)"),
    "reduce_zero_label": (lambda v: not isinstance(v, bool), "true or false"),
    "name": (lambda v: not isinstance(v, (str, int)) or isinstance(v, bool), "a name"),
}


def default_palette(num_classes: int) -> list[list[int]]:
    """Distinct colours: black for class 0, then a fixed pseudo-random palette (stable across runs)."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(40, 256, size=(max(num_classes, 1), 3))
    colours[0] = 0
    return colours.tolist()


def split_dirs(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, mask folder) of ``split`` under ``root``, ADE20k style."""
    root = Path(root)
    images = root / "images" / split
    if not images.is_dir():
        raise FileNotFoundError(f"expected an image folder {images} (layout ROOT/images/SPLIT, ROOT/annotations/SPLIT)")
    for name in MASK_DIRS:
        masks = root / name / split
        if masks.is_dir():
            return images, masks
    raise FileNotFoundError(f"expected a mask folder {' or '.join(str(root / n / split) for n in MASK_DIRS)}")


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """int64 (H, W) class indices from a single-channel (grey, 16-bit or palette) mask image; ValueError naming the
    file if it cannot be read (:func:`xcit.data.images.open_image`: also above the pixel limit) or holds colours."""
    try:
        with open_image(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img) if mode in ("L", "P", "1", "I;16", "I;16B", "I;16L", "I") else None
    except ValueError as err:
        raise ValueError(str(err).replace("cannot read image", "cannot read mask", 1)) from err
    if arr is None:
        raise ValueError(f"mask {display_path(path)!r} has mode {mode}; expected a single-channel image of class "
                         "indices (grey 'L', palette 'P' or 16-bit), not colours")
    return torch.from_numpy(arr.astype(np.int64))


def _by_stem(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """Files of ``folder`` by name without extension; two files of one name (``a.png``, ``a.jpg``) are an error
    rather than one of them silently left out."""
    found: dict[str, Path] = {}
    for path in list_images(folder, recursive=False, extensions=exts):
        if path.stem in found:
            raise ValueError(f"{display_path(folder)} holds {display_path(found[path.stem].name)} and "
                             f"{display_path(path.name)}: images and masks are matched by name without extension, "
                             "so expected one file per name")
        found[path.stem] = path
    return found


class SegmentationFolder(torch.utils.data.Dataset):
    """Pairs of image and class-index mask matched by file stem.

    Masks are checked when read: values must be ``0..num_classes-1`` or ``ignore_index`` (after
    zero-label reduction, which maps 0 to ignore and k to k-1, as for ADE20k), and the mask must
    have the image's size. ``transform(image uint8 (3,H,W), mask int64 (H,W)) -> (image, mask)``.
    """

    def __init__(
        self, images: str | os.PathLike, masks: str | os.PathLike, num_classes: int, *, ignore_index: int = 255,
        reduce_zero_label: bool = False, transform=None,
    ) -> None:
        self.images_dir, self.masks_dir = Path(images), Path(masks)
        for kind, folder in (("image", self.images_dir), ("mask", self.masks_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"expected a {kind} folder, got {str(folder)!r} which is not a directory")
        imgs = _by_stem(self.images_dir, IMAGE_EXTENSIONS)
        if not imgs:
            raise ValueError(f"no images found in {self.images_dir} (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        msks = _by_stem(self.masks_dir, MASK_EXTS)
        if not msks:
            raise ValueError(f"no masks found in {self.masks_dir} (expected files ending in {', '.join(MASK_EXTS)})")
        missing = [s for s in imgs if s not in msks]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(imgs)} images in {self.images_dir} have no mask in {self.masks_dir} "
                f"(matched by name without extension), e.g. {', '.join(missing[:5])}"
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"expected ignore_index outside 0..{num_classes - 1}, got {ignore_index}")
        self.samples = [(imgs[s], msks[s]) for s in imgs]
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image (3, H, W), int64 mask (H, W)), checked, without the transform."""
        img_path, mask_path = self.samples[index]
        image, mask = read_image(img_path), read_mask(mask_path)
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            raise ValueError(
                f"image {img_path} is {image.shape[2]}x{image.shape[1]} (WxH) but its mask {mask_path} is "
                f"{mask.shape[1]}x{mask.shape[0]}; expected the same size"
            )
        if self.reduce_zero_label:
            ignore = (mask == 0) | (mask == self.ignore_index)
            mask = torch.where(ignore, torch.full_like(mask, self.ignore_index), mask - 1)
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = mask[bad].unique()[:10].tolist()
            raise ValueError(
                f"mask {mask_path} holds values {values} outside the class range 0..{self.num_classes - 1} "
                f"(ignore index {self.ignore_index}{', after zero-label reduction' if self.reduce_zero_label else ''}); "
                "check --num-classes, --ignore-index and --reduce-zero-label"
            )
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask

    def check(self) -> None:
        """Read every pair once, raising the first problem (size mismatch, out-of-range value)."""
        for i in range(len(self)):
            self.load(i)


# ----------------------------------------------------------------------------------------- transforms


def rescale_factor(h: int, w: int, scale: Sequence[int] | None, ratio: float = 1.0) -> float:
    """mmseg-style keep-ratio rescale: fit (long, short) = ``scale * ratio`` (or just ``ratio`` without a scale)."""
    if scale is None:
        return ratio
    long_max, short_max = max(scale) * ratio, min(scale) * ratio
    return min(long_max / max(h, w), short_max / min(h, w))


def resize_pair(image: torch.Tensor, mask: torch.Tensor | None, factor: float):
    h, w = image.shape[-2:]
    size = (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))
    if size == (h, w):
        return image, mask
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
    image = img[0].round().clamp(0, 255).to(torch.uint8)
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


def normalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float normalised."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
    return (image.float() - m) / s


def photometric_distortion(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion: brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18
    degrees, each with probability 1/2, contrast before or after the colour changes."""
    from torchvision.transforms.v2 import functional as TF

    x = image.float()
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    x = x.clamp(0, 255)
    if rng.random() < 0.5:
        x = TF.adjust_saturation(x / 255, rng.uniform(0.5, 1.5)) * 255
    if rng.random() < 0.5:
        x = TF.adjust_hue(x / 255, rng.uniform(-18, 18) / 360) * 255
    if not contrast_first and rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    return x.clamp(0, 255).round().to(torch.uint8)


class TrainTransform:
    """The paper's ADE20k augmentation (mmseg recipe), with every knob exposed.

    Random keep-ratio rescale to ``scale`` x U(ratio_range) (ADE20k: 2048x512, 0.5-2.0), random
    ``crop_size`` crop re-drawn up to 10 times while one class covers more than ``cat_max_ratio``
    of it, horizontal flip (p 0.5), photometric distortion, normalisation, and padding to the crop
    size (mask padded with the ignore index). Returns (float (3, h, w), int64 (h, w)).
    """

    def __init__(
        self, crop_size: Sequence[int] = (512, 512), scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip: float = 0.5,
        photometric: bool = True, ignore_index: int = 255, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None,
    ) -> None:
        self.crop = tuple(crop_size)
        self.scale, self.ratio_range, self.cat_max_ratio = scale, tuple(ratio_range), cat_max_ratio
        self.flip, self.photometric, self.ignore_index = flip, photometric, ignore_index
        self.mean, self.std = mean, std
        self.rng = random.Random(seed)

    def _crop_box(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        h, w = mask.shape
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        box = (0, 0, ch, cw)
        for _ in range(10):
            y, x = self.rng.randint(0, h - ch), self.rng.randint(0, w - cw)
            box = (y, x, ch, cw)
            if self.cat_max_ratio >= 1.0:
                break
            labels = mask[y:y + ch, x:x + cw]
            labels = labels[labels != self.ignore_index]
            counts = torch.bincount(labels) if labels.numel() else torch.zeros(0)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = mask.shape
        factor = rescale_factor(h, w, self.scale, self.rng.uniform(*self.ratio_range))
        image, mask = resize_pair(image, mask, factor)
        y, x, ch, cw = self._crop_box(mask)
        image, mask = image[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]
        if self.rng.random() < self.flip:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, self.rng)
        out = normalize(image, self.mean, self.std)
        ph, pw = self.crop[0] - ch, self.crop[1] - cw
        if ph or pw:
            out = F.pad(out, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore_index)
        return out, mask.contiguous()

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)


# ----------------------------------------------------------------------------------------- inference


@torch.no_grad()
def infer(
    model: torch.nn.Module, image: torch.Tensor, *, mode: str = "whole", scale: Sequence[int] | None = None,
    crop_size: Sequence[int] = (512, 512), stride: Sequence[int] | None = None, flip: bool = False,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities (num_classes, H, W) at the image's own size for one uint8 (3, H, W) image.

    The image is first rescaled to fit ``scale`` (keep ratio; ``None`` keeps it), then predicted
    whole or with overlapping ``crop_size`` windows every ``stride`` pixels (mode ``"slide"``,
    softmax averaged where windows overlap); ``flip`` adds the mirrored prediction.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"expected mode 'whole' or 'slide', got {mode!r}")
    device = next(model.parameters()).device
    h, w = image.shape[-2:]
    resized, _ = resize_pair(image, None, rescale_factor(h, w, scale))
    x = normalize(resized, mean, std)[None].to(device)

    def run(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = _slide(model, inp, crop_size, stride or crop_size) if mode == "slide" else model(inp).softmax(1)
        return out.float()

    probs = run(x)
    if flip:
        probs = (probs + run(x.flip(-1)).flip(-1)) / 2
    return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0].cpu()


def _slide(model, x: torch.Tensor, crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    _, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(math.ceil((h - ch) / sh), 0) + 1
    cols = max(math.ceil((w - cw) / sw), 0) + 1
    probs, count = None, torch.zeros(1, 1, h, w, device=x.device)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, h - ch), min(c * sw, w - cw)
            p = model(x[:, :, y1:y1 + ch, x1:x1 + cw]).softmax(1)
            if probs is None:
                probs = torch.zeros(1, p.shape[1], h, w, device=x.device, dtype=p.dtype)
            probs[:, :, y1:y1 + ch, x1:x1 + cw] += p
            count[:, :, y1:y1 + ch, x1:x1 + cw] += 1
    return probs / count


def colorize(mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> Image.Image:
    """A palette ('P' mode) PNG image of class indices; ignored pixels are white."""
    arr = np.asarray(mask, dtype=np.int64)
    img = Image.fromarray(np.where(arr == ignore_index, 255, arr).clip(0, 255).astype(np.uint8), "P")
    flat = [0] * 768
    for i, colour in enumerate(palette[:255]):
        flat[3 * i:3 * i + 3] = [int(c) for c in colour]
    flat[765:768] = [255, 255, 255]
    img.putpalette(flat)
    return img


def overlay(image: torch.Tensor, mask_img: Image.Image, alpha: float = 0.5) -> Image.Image:
    """Blend a colourised mask over a uint8 (3, H, W) image."""
    base = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    return Image.blend(base, mask_img.convert("RGB"), alpha)
