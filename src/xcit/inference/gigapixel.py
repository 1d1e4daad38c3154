"""Whole large images through the streaming forward: classification and slide-level embeddings.

Used by ``xcit predict`` (above a pixel threshold, or when asked) and ``xcit embed``. The image is
read memory-mapped where the format allows (:mod:`xcit.data.large_images`), normalised tile by
tile, and classified at its native resolution with :func:`xcit.streaming`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import display_path
from ..data.large_images import image_size, read_large_image
from ..data.outputs import atomic_write, claim_file
from .loading import InferenceModel
from .predict import Prediction
from .streaming import DEFAULT_TOKENS_PER_CHUNK, StreamingXCiT, streaming

#: Above this many pixels ``xcit predict`` / ``xcit attention`` use the streaming forward at native
#: resolution (8192 x 8192; PIL's own decompression-bomb guard starts at about 89 million).
LARGE_IMAGE_PIXELS = 8192 * 8192


def is_large(path: str | os.PathLike, max_pixels: int = LARGE_IMAGE_PIXELS) -> bool:
    """Whether the image has more than ``max_pixels`` pixels (from its header; False if unreadable)."""
    try:
        h, w = image_size(path)
    except ValueError:
        return False
    return h * w > max_pixels


def stream_model(inf: InferenceModel, tokens_per_chunk: int = DEFAULT_TOKENS_PER_CHUNK) -> StreamingXCiT:
    """The streaming forward of ``inf``'s model, normalising uint8 pixels with its mean / std."""
    return streaming(inf.model.eval(), inf.mean, inf.std, tokens_per_chunk)


def predict_large(stream: StreamingXCiT, classes: Sequence[str], path: str | os.PathLike, top_k: int = 5) -> Prediction:
    """Top-k classes of one image at its native resolution; an unreadable file gives ``error``."""
    try:
        pixels = read_large_image(path, stream.model.in_chans)
    except ValueError as err:
        return Prediction(os.fspath(path), error=str(err))
    probs = stream(pixels).float().softmax(dim=-1)[0]
    p, idx = probs.topk(min(top_k, probs.numel()))
    return Prediction(os.fspath(path), [classes[i] for i in idx.tolist()], idx.tolist(), p.tolist())


@dataclass
class Embeddings:
    """Per-image embeddings: the normalised cls token and the mean normalised patch token (n, C each)."""

    paths: list[str]
    cls: np.ndarray
    mean_patch: np.ndarray
    grid: np.ndarray  # (n, 2): Hp, Wp

    def save(self, path: str | os.PathLike, meta: dict | None = None, *, overwrite: bool = False) -> Path:
        """Write ``.npz`` (arrays ``paths``, ``cls``, ``mean_patch``, ``grid`` and a JSON ``meta`` string); an existing
        file is refused unless ``overwrite``, and is replaced only once the new one is complete. ``paths`` are
        valid UTF-8 (:func:`xcit.data.images.display_path`)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"expected an output file ending in .npz, got {display_path(path)!r}")
        claim_file(path, overwrite=overwrite)
        with atomic_write(path) as tmp:
            np.savez(tmp, paths=np.array([display_path(p) for p in self.paths], dtype=str), cls=self.cls,
                     mean_patch=self.mean_patch, grid=self.grid, meta=np.array(json.dumps(meta or {})))
        return path


def embed_images(
    stream: StreamingXCiT, paths: Sequence[str | os.PathLike], on_error: Callable[[str, str], None] | None = None
) -> Embeddings:
    """Embeddings of each readable image at native resolution (unreadable ones go to ``on_error``)."""
    done, cls, mean, grid = [], [], [], []
    for path in paths:
        try:
            pixels = read_large_image(path, stream.model.in_chans)
        except ValueError as err:
            if on_error is None:
                raise
            on_error(os.fspath(path), str(err))
            continue
        out = stream.run(pixels)
        done.append(os.fspath(path))
        cls.append(out.cls[0].float().cpu().numpy())
        mean.append(out.mean_patch[0].float().cpu().numpy())
        grid.append(out.grid)
    width = stream.model.embed_dim
    return Embeddings(
        done, np.stack(cls) if cls else np.zeros((0, width), np.float32),
        np.stack(mean) if mean else np.zeros((0, width), np.float32), np.array(grid, dtype=np.int64).reshape(-1, 2),
    )

