"""Segmenting one large image file (whole-slide, aerial) to a pyramidal label TIFF, an overlay and class areas.

The image (a level of a pyramidal TIFF / OME-TIFF / SVS, or any image file) is read a region at a time
(:func:`xcit.data.slides.open_slide`), segmented tile by tile with the exact global context of the whole image
(:class:`xcit.segment.tiled.TiledSegmenter`), and the labels are written band by band as they come
(:func:`xcit.data.slides.write_label_tiff`). Nothing of the image's size is held in memory but the backbone's token
tensor (4 bytes x channels per patch) and a band of labels.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..data.slides import (
    OVERVIEW_SIDE,
    class_areas,
    open_slide,
    read_overview,
    write_json_atomically,
    write_label_tiff,
    write_overlay,
)
from ..train.metrics import progress_bar
from .heads import Segmenter
from .tiled import DEFAULT_TILE, TiledSegmenter

def output_names(stem: str) -> list[str]:
    """The files :func:`segment_file` writes for an image of output name ``stem``."""
    return [f"{stem}_labels.tif", f"{stem}_overlay.png", f"{stem}_areas.json"]


def segment_file(
    model: Segmenter, path: str | os.PathLike, out: str | os.PathLike, stem: str, *,
    mean: Sequence[float], std: Sequence[float], classes: Sequence[str], palette: Sequence[Sequence[int]],
    level: int | None = None, mpp: float | None = None, tile: int = DEFAULT_TILE, tokens_per_chunk: int | None = None,
    max_resident_bytes: int | None = None, alpha: float = 0.5, overwrite: bool = False, progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Segment the image at ``path`` (its pyramid level ``level``, or the one nearest ``mpp`` microns per pixel) and
    write ``out/STEM_labels.tif`` (tiled, compressed, pyramidal label TIFF: pixel values are class indices),
    ``STEM_overlay.png`` (the labels over a downsampled image) and ``STEM_areas.json`` (pixels, share and, where the
    file states its pixel size or georeference, area per class). Returns that summary. An unreadable file, level or
    tile raises ``ValueError`` naming it; nothing is left under a final name on error."""
    out = Path(out)
    with open_slide(path, level=level, mpp=mpp, in_chans=model.backbone.in_chans) as slide:
        tiler = TiledSegmenter(model, mean, std, tile, tokens_per_chunk, max_resident_bytes)
        h, w = slide.shape[:2]
        model.check_size(h, w)  # before the overview is read
        overview = read_overview(slide, OVERVIEW_SIDE)
        sampler = _Sampler((h, w), overview.shape[:2])
        counts = np.zeros(model.num_classes, dtype=np.int64)
        started = time.time()
        bar = progress_bar(len(tiler.boxes(h, w)), "segment", progress)
        bar.unit = "tile"
        dtype = np.uint8 if model.num_classes <= 256 else np.uint16

        def bands() -> Iterator[np.ndarray]:
            band = None
            for t in tiler.tiles(slide):
                if t.x0 == 0:
                    band = np.empty((t.y1 - t.y0, w), dtype=dtype)
                labels = t.labels.numpy()
                band[:, t.x0:t.x1] = labels
                counts[:] += np.bincount(labels.ravel(), minlength=model.num_classes)[: model.num_classes]
                sampler.take(t.y0, t.x0, labels)
                bar.update(1)
                if t.x1 == w:
                    yield band

        description = {"classes": list(classes), "palette": [list(map(int, c)) for c in palette],
                       "source": os.fspath(path), "level": slide.level, **(meta or {})}
        try:
            labels_path = write_label_tiff(out / f"{stem}_labels.tif", h, w, bands(), overwrite=overwrite,
                                           description=description)
        finally:
            bar.close()
        seconds = time.time() - started
        write_overlay(out / f"{stem}_overlay.png", overview, sampler.small, palette, alpha, overwrite=overwrite)
        summary = {
            "image": os.fspath(path), "level": slide.level, "size": [h, w], "labels": labels_path.name,
            "seconds": round(seconds, 2), "tile": tile, "halo_cells": tiler.halo,
            **class_areas(counts, list(classes), mpp=slide.mpp, georef=slide.georef),
        }
        write_json_atomically(out / f"{stem}_areas.json", summary, overwrite=overwrite)
        return summary


class _Sampler:
    """The label map sampled (nearest) at the overview's pixel centres, filled in tile by tile."""

    def __init__(self, size: tuple[int, int], small: tuple[int, int]) -> None:
        (h, w), (sh, sw) = size, small
        self.ys = np.minimum(((np.arange(sh) + 0.5) * h / sh).astype(np.int64), h - 1)
        self.xs = np.minimum(((np.arange(sw) + 0.5) * w / sw).astype(np.int64), w - 1)
        self.small = np.zeros((sh, sw), dtype=np.int64)

    def take(self, y0: int, x0: int, labels: np.ndarray) -> None:
        th, tw = labels.shape
        ri = np.nonzero((self.ys >= y0) & (self.ys < y0 + th))[0]
        ci = np.nonzero((self.xs >= x0) & (self.xs < x0 + tw))[0]
        if ri.size and ci.size:
            self.small[np.ix_(ri, ci)] = labels[np.ix_(self.ys[ri] - y0, self.xs[ci] - x0)]

