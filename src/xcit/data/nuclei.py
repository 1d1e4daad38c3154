"""The stardist nuclei image: a 512x512 fluorescence image with 125 labelled nuclei.

Ships in the ``stardist`` wheel (BSD-3-Clause; install with ``pip install --no-deps stardist``) as
``stardist/data/images/img2d.tif`` + ``mask2d.tif``; stardist describes it as an image of the
2018 Kaggle Data Science Bowl (Caicedo et al., Nature Methods 2019). The held-out split is
:mod:`xcit.data.split`'s bottom-right quadrant.
"""
from __future__ import annotations

import io
import os

import numpy as np

from .images import open_image
from .packaged import package_file
from .split import HELD_OUT_QUADRANT, TRAIN_QUADRANTS, quadrant_slices

PIP = "pip install --no-deps stardist==0.9.2"
CLASSES = ["background", "nucleus"]


def _tif(relpath: str, source: str | os.PathLike | None) -> np.ndarray:
    name = f"{os.fspath(source)}/stardist/{relpath}" if source is not None else f"stardist/{relpath}"
    with open_image(io.BytesIO(package_file("stardist", relpath, source, PIP)), name=name) as img:
        return np.array(img)


def load_nuclei(source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint16 (512, 512), instance labels uint16 (512, 512), 0 = background)."""
    image = _tif("data/images/img2d.tif", source)
    labels = _tif("data/images/mask2d.tif", source)
    if image.shape != labels.shape:
        raise ValueError(f"stardist nuclei: image {image.shape} and mask {labels.shape} differ")
    return image, labels


def to_uint8(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> tuple[np.ndarray, tuple[float, float]]:
    """Percentile contrast stretch to 8 bits (stardist's usual 1-99.8 % normalisation), computed on
    the training quadrants only; returns the image and the (low, high) intensities used."""
    h, w = image.shape
    train = np.concatenate([image[quadrant_slices(h, w, q)].ravel() for q in TRAIN_QUADRANTS]).astype(np.float64)
    lo, hi = np.percentile(train, [low, high])
    out = ((image.astype(np.float64) - lo) / max(hi - lo, 1e-6) * 255).clip(0, 255).round().astype(np.uint8)
    return out, (float(lo), float(hi))


def split_nuclei(source: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{quadrant: (uint8 image, instance labels)} for the four quadrants (see :mod:`xcit.data.split`)."""
    image, labels = load_nuclei(source)
    image8, _ = to_uint8(image)
    h, w = image.shape
    return {q: (image8[quadrant_slices(h, w, q)], labels[quadrant_slices(h, w, q)]) for q in (*TRAIN_QUADRANTS, HELD_OUT_QUADRANT)}
