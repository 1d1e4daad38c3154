"""DINO's multi-crop augmentation: 2 global + N local crops with flips, colour jitter, blur, solarisation.

Two executors of one :class:`MultiCropSpec`:

* :class:`BatchMultiCrop` augments a whole uint8 batch (B, C, H, W) of an in-memory dataset at once
  (random resized crops as affine resampling, per-image jitter factors, per-image Gaussian kernels),
  which is what makes 28x28 pretraining fast on a CPU;
* :class:`PILMultiCrop` is the per-image torchvision pipeline for class folders (DINO's own).

Both return a list of crops: ``[global 1, global 2, local 1, ..., local N]``, each normalised.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MultiCropSpec:
    """Crop geometry and photometric settings (DINO's defaults for 224-pixel images)."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2  # global 2 only

    @classmethod
    def from_config(cls, cfg) -> MultiCropSpec:
        return cls(cfg.global_size, tuple(cfg.global_scale), cfg.local_crops, cfg.local_size, tuple(cfg.local_scale),
                   cfg.hflip, cfg.jitter_prob, grayscale_prob=cfg.grayscale_prob, blur_prob=tuple(cfg.blur_prob),
                   blur_sigma=tuple(cfg.blur_sigma), solarize_prob=cfg.solarize_prob)

    @property
    def n_crops(self) -> int:
        return 2 + self.local_crops

    def crops(self) -> list[tuple[int, tuple[float, float], float, float]]:
        """(size, scale range, blur probability, solarisation probability) of each crop, in output order."""
        g1 = (self.global_size, self.global_scale, self.blur_prob[0], 0.0)
        g2 = (self.global_size, self.global_scale, self.blur_prob[1], self.solarize_prob)
        local = (self.local_size, self.local_scale, self.blur_prob[2], 0.0)
        return [g1, g2] + [local] * self.local_crops


def _uniform(n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.empty(n).uniform_(lo, hi)


def resized_crop_grid(n: int, size: int, scale: tuple[float, float], hflip: float,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Sampling grids (n, size, size, 2) of random resized crops (area fraction in ``scale``, aspect in
    ``ratio``, centre uniform where the crop fits) with random horizontal flips, for ``grid_sample``."""
    area = _uniform(n, *scale)
    # aspect ratios for which the crop fits in the image (what torchvision's retries amount to)
    lo = area.log().clamp(min=math.log(ratio[0]))
    hi = (-area.log()).clamp(max=math.log(ratio[1]))
    log_r = lo + torch.rand(n) * (hi - lo)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n) * 2 - 1) * (1 - w)
    cy = (torch.rand(n) * 2 - 1) * (1 - h)
    sx = torch.where(torch.rand(n) < hflip, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (in that order) of a float batch in [0, 1], each
    image jittered with probability ``jitter_prob``; then random greying of RGB images."""
    n = x.shape[0]
    apply = (torch.rand(n) < spec.jitter_prob).view(n, 1, 1, 1)
    y = x * _uniform(n, 1 - spec.brightness, 1 + spec.brightness).view(n, 1, 1, 1)
    y = y.clamp(0, 1)
    mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * _uniform(n, 1 - spec.contrast, 1 + spec.contrast).view(n, 1, 1, 1) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        grey = _grey(y)
        y = ((y - grey) * _uniform(n, 1 - spec.saturation, 1 + spec.saturation).view(n, 1, 1, 1) + grey).clamp(0, 1)
        if spec.hue > 0:
            from torchvision.transforms.v2 import functional as TF

            shifts = _uniform(n, -spec.hue, spec.hue)
            y = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(y, shifts)])
    x = torch.where(apply, y, x)
    if x.shape[1] == 3 and spec.grayscale_prob > 0:
        to_grey = (torch.rand(n) < spec.grayscale_prob).view(n, 1, 1, 1)
        x = torch.where(to_grey, _grey(x).expand_as(x), x)
    return x


def gaussian_blur(x: torch.Tensor, prob: float, sigma: tuple[float, float]) -> torch.Tensor:
    """Blur each image of a float batch with probability ``prob`` by a Gaussian of its own sigma."""
    n, c, h, w = x.shape
    chosen = torch.rand(n) < prob
    if not chosen.any():
        return x
    s = _uniform(n, *sigma)
    radius = max(1, min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2 or 1))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / s[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 2r+1)
    mode = "reflect" if min(h, w) > radius else "replicate"
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode=mode)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    return torch.where(chosen.view(n, 1, 1, 1), y, x)


def solarize(x: torch.Tensor, prob: float, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels >= ``threshold`` of each image with probability ``prob``."""
    chosen = (torch.rand(x.shape[0]) < prob).view(-1, 1, 1, 1)
    return torch.where(chosen & (x >= threshold), 1.0 - x, x)


class BatchMultiCrop:
    """uint8 batch (B, C, H, W) -> list of normalised float crop batches (see the module doc)."""

    def __init__(self, spec: MultiCropSpec, mean: Sequence[float], std: Sequence[float]) -> None:
        self.spec = spec
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float().div_(255)
        out = []
        for size, scale, blur, sol in self.spec.crops():
            grid = resized_crop_grid(len(x), size, scale, self.spec.hflip)
            crop = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            crop = color_jitter(crop, self.spec)
            crop = gaussian_blur(crop, blur, self.spec.blur_sigma)
            if sol > 0:
                crop = solarize(crop, sol)
            out.append((crop - self.mean) / self.std)
        return out


class PILMultiCrop:
    """PIL image -> list of normalised crops, with torchvision (DINO's per-image pipeline, for folders)."""

    def __init__(self, spec: MultiCropSpec, mean: Sequence[float], std: Sequence[float]) -> None:
        from torchvision.transforms import v2

        self.spec = spec
        self.pipelines = []
        for size, scale, blur, sol in spec.crops():
            kernel = 2 * math.ceil(3 * spec.blur_sigma[1]) + 1
            steps = [
                v2.ToImage(),
                v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(spec.hflip),
                v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_prob),
                v2.RandomGrayscale(spec.grayscale_prob),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=spec.blur_sigma)], p=blur),
                v2.RandomSolarize(128, p=sol),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
            self.pipelines.append(v2.Compose(steps))

    def __call__(self, image) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline in self.pipelines]
