"""Detection on images of any size: one global backbone pass, then the neck and heads over overlapping tiles.

:func:`detect_large` runs a loaded detector (:func:`xcit.detect.model.load_detector`) on a uint8 (H, W, 3) image, a
numpy array, memory map or lazy slide level, without ever passing the whole image to the model or making a
full-resolution float copy of it:

1. **Backbone, global.** The XCA trunk runs once over the whole (zero-padded) image with the streaming forward
   (:func:`xcit.inference.dense.stream_pyramid`), so every feature sees the global cross-covariance context exactly
   as ``model([image])`` would; the four pyramid levels are then read a window at a time.
2. **Neck, per tile, exact.** The FPN's lateral 1x1 convolutions and nearest top-down upsampling are pointwise and
   its output 3x3 convolutions need one cell around each output, so the tile's four level windows are taken with a
   halo of one stride-32 cell (8 / 4 / 2 / 1 cells at strides 4 / 8 / 16 / 32), run through the model's own
   ``FeaturePyramidNetwork`` and cropped: the tile's neck outputs equal the whole image's. P6 (``pool``) is the
   tile's P5 subsampled, as the model computes it on an image of the tile's size.
3. **Heads, per tile.** torchvision's RPN and RoI heads of the model run on the tile's features (an ``ImageList`` of
   the tile, its part inside the image as the image size), with the RPN's pre/post-NMS proposal counts and the
   detections kept per tile scaled by the tile's area over the model's configured image area (its test size
   squared): a 1024 x 1024 tile of a detector tested at 800 px gets 1.64x the budget of one 800 x 800 image.
4. **Merge.** Each tile owns a core (the overlaps split at their middle); a detection is kept only from the tile whose
   core holds its box centre. An object no larger than the overlap lies wholly inside the tile owning its centre, and
   its truncated copy in the neighbour has its centre outside the neighbour's core, so it is reported once. Two
   tiles' estimates of one object can still straddle the core boundary (their centres a few pixels either side):
   detections of neighbouring tiles are suppressed greedily, class by class, when they overlap at the model's own
   NMS IoU or when the smaller box lies 70 % inside the other (:func:`merge_detections`). Masks stay box-relative
   (M x M probabilities with the box) and are pasted box by box only when the outputs are written (RLE in the COCO
   file), never as full-image masks.

With a single tile (``tile=None``, or a tile covering the padded image) this is ``model([image])`` at the image's own
resolution (``set_test_size(model, 0)``, as ``xcit detect predict --test-size 0``): the same features, proposals
and budgets. The image is always processed at its own resolution (choose a slide level for coarser ones).

:func:`predict_large_file` is the command-line entry: it opens a file level by :func:`xcit.data.slides.open_slide`
(whole-slide and Geo TIFFs read a region at a time, other formats whole) and writes the COCO-style JSON, a GeoJSON of
the boxes in map coordinates when the level is georeferenced, and a downsampled overlay PNG, all or none.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from ..data.images import display_path
from ..data.outputs import atomic_write, claim_files
from ..train.metrics import progress_bar
from .evaluation import to_coco_results
from .model import XCiTFPN
from .transform import box_mask_patches

#: Default tile side: a 1024-pixel tile holds the P2 neck window (256 x 256 cells of FPN channels) comfortably and
#: is close to the image sizes detectors are trained and tested at (800..1333).
DEFAULT_TILE = 1024
#: Default overlap: every object up to 256 pixels lies wholly inside the tile owning its centre (tree crowns and
#: nuclei are far smaller; the anchors 32..256 of four of the five default levels fit), at (1024 / 768)^2 = 1.8x
#: the neck and head work of tiles without overlap. The backbone's trunk runs once whatever the overlap.
DEFAULT_OVERLAP = 256
#: Tiles start and end on the stride-32 grid: every pyramid level then has whole cells in each tile.
ALIGN = 32
#: Halo of the neck windows, in pixels: one cell of the stride-32 level, at least one cell of every level.
HALO = 32
#: Smallest tile: below 128 pixels torchvision's RoI pooling misjudges the level scales of a tile near the padding.
MIN_TILE = 128
#: Detections of one class from neighbouring tiles are one object when the smaller box lies this much inside the
#: other (intersection over the smaller box), besides the model's NMS rule (IoU over its threshold).
CROSS_TILE_IOS = 0.7


@dataclass(frozen=True)
class Tile:
    """One tile, in pixels of the padded image: rows [y0, y0 + height), columns [x0, x0 + width).

    ``valid`` is its (rows, columns) inside the image (the rest is the zero padding of the batching); ``core``
    (cy0, cy1, cx0, cx1) is the region whose detections it reports (by box centre; infinite at the image's edges).
    """

    y0: int
    x0: int
    height: int
    width: int
    valid: tuple[int, int]
    core: tuple[float, float, float, float]


@dataclass
class LargeDetections:
    """Detections of :func:`detect_large`, in image pixels, sorted by decreasing score.

    Attributes:
        boxes: (N, 4) float x0, y0, x1, y1. scores: (N,). labels: (N,) int64, 1-based classes.
        masks: (N, 1, M, M) box-relative mask probabilities (Mask R-CNN), else None; see :meth:`mask_patches`.
        tile_ids: (N,) index into ``tiles`` of the tile that reported each detection.
        tiles: the tiles. image_size: (H, W). seconds: {"backbone": trunk pass, "tiles": neck + heads + merge}.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    tile_ids: torch.Tensor
    tiles: list[Tile]
    image_size: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def select(self, keep: torch.Tensor) -> LargeDetections:
        """The detections ``keep`` (indices or a boolean mask)."""
        return LargeDetections(self.boxes[keep], self.scores[keep], self.labels[keep],
                               None if self.masks is None else self.masks[keep], self.tile_ids[keep], self.tiles,
                               self.image_size, dict(self.seconds))

    def above(self, score_thresh: float) -> LargeDetections:
        """The detections scoring at least ``score_thresh``."""
        return self.select(self.scores >= score_thresh)

    def output(self) -> dict[str, torch.Tensor]:
        """boxes, scores, labels as the model's output dict (no pasted masks)."""
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}

    def mask_patches(self) -> Iterator[tuple[int, int, int, int, int, torch.Tensor]]:
        """(i, ya, yb, xa, xb, probabilities) of each mask pasted over its box only (as the model pastes them)."""
        if self.masks is not None:
            yield from box_mask_patches(self.masks, self.boxes, self.image_size)


# ----------------------------------------------------------------------------- tiles and budgets


def tile_starts(length: int, tile: int, overlap: int, align: int = ALIGN) -> list[int]:
    """Starts of tiles of side ``tile`` covering ``length`` (a multiple of ``align``), overlapping by at least
    ``overlap``, spread evenly: the fewest tiles whose step is at most ``tile - overlap``. Starts lie on the
    ``2 * align`` grid where the step allows it, so that the FPN's extra level (every other cell of the stride-32
    level) is the whole image's in every tile; the last tile then reaches the end with up to ``align`` more rows
    (:func:`tile_sizes`)."""
    if length <= tile:
        return [0]
    grid = 2 * align if tile - overlap >= 2 * align else align
    units, step = (length - tile) // grid, (tile - overlap) // grid
    if units == 0:
        return [0]
    n = -(-units // step) + 1
    return [grid * (k * units // (n - 1)) for k in range(n)]


def tile_sizes(starts: list[int], length: int, tile: int) -> list[int]:
    """Each tile's side: ``tile``, the last one whatever reaches ``length``."""
    return [min(tile, length)] * (len(starts) - 1) + [length - starts[-1]]


def _cores(starts: list[int], size: int) -> list[tuple[float, float]]:
    """Each tile's core along one axis: its overlaps with the neighbours split at their middle."""
    cuts = [(a + size + b) / 2 for a, b in zip(starts, starts[1:])]
    return list(zip([-math.inf, *cuts], [*cuts, math.inf]))


def plan_tiles(height: int, width: int, tile: int | None, overlap: int, align: int = ALIGN) -> list[Tile]:
    """The tiles of an image of ``height`` x ``width`` (padded to ``align``), row by row; ``tile=None``: one tile."""
    hp, wp = -(-height // align) * align, -(-width // align) * align
    th, tw = (hp, wp) if tile is None else (min(tile, hp), min(tile, wp))
    rows, cols = tile_starts(hp, th, overlap, align), tile_starts(wp, tw, overlap, align)
    heights, widths = tile_sizes(rows, hp, th), tile_sizes(cols, wp, tw)
    return [Tile(y0, x0, h, w, (min(h, height - y0), min(w, width - x0)), (*cy, *cx))
            for y0, h, cy in zip(rows, heights, _cores(rows, th)) for x0, w, cx in zip(cols, widths, _cores(cols, tw))]


def reference_area(model: nn.Module) -> int:
    """The image area the detector's proposal budgets are configured for: its test-time shorter side squared (else
    its largest training side; torchvision's 800 for a detector that only ever ran at native resolution)."""
    t = model.transform
    side = getattr(t, "test_size", 0) or max(getattr(t, "train_sizes", t.min_size)) or 800
    return int(side) ** 2


def tile_budgets(model: nn.Module, area: int, reference: int | None = None) -> dict[str, int]:
    """The RPN's pre- and post-NMS proposal counts and the detections kept for a tile of ``area`` pixels: the
    model's test-time settings scaled by ``area / reference`` (default :func:`reference_area`), at least 1."""
    ratio = area / (reference or reference_area(model))
    rpn = model.rpn

    def scaled(n: int) -> int:
        return max(1, round(n * ratio))

    return {"pre_nms": scaled(rpn._pre_nms_top_n["testing"]), "post_nms": scaled(rpn._post_nms_top_n["testing"]),
            "detections": scaled(model.roi_heads.detections_per_img)}


@contextmanager
def using_budgets(model: nn.Module, budgets: dict[str, int] | None) -> Iterator[None]:
    """The model's test-time proposal and detection counts set to ``budgets`` inside the block (None: as they are)."""
    if budgets is None:
        yield
        return
    rpn, roi = model.rpn, model.roi_heads
    saved = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), roi.detections_per_img
    rpn._pre_nms_top_n = {**saved[0], "testing": budgets["pre_nms"]}
    rpn._post_nms_top_n = {**saved[1], "testing": budgets["post_nms"]}
    roi.detections_per_img = budgets["detections"]
    try:
        yield
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n, roi.detections_per_img = saved


# ----------------------------------------------------------------------------- features and heads per tile


def tile_features(fpn: nn.Module, maps, tile: Tile) -> OrderedDict[str, torch.Tensor]:
    """The FPN outputs ("0".."3", "pool") of ``tile``, equal to the whole image's neck over the tile: the pyramid
    ``maps`` (:class:`xcit.inference.dense.PyramidMaps`) are read with a halo of :data:`HALO` pixels, run through
    ``fpn`` and cropped; "pool" is computed from the cropped P5 by the FPN's extra block."""
    windows: OrderedDict[str, torch.Tensor] = OrderedDict()
    crops = []
    for level, stride in enumerate(maps.strides):
        halo = HALO // stride
        y0, x0, h, w = tile.y0 // stride, tile.x0 // stride, tile.height // stride, tile.width // stride
        lh, lw = maps.sizes[level]
        wy0, wx0 = max(y0 - halo, 0), max(x0 - halo, 0)
        windows[str(level)] = maps.window(level, wy0, min(y0 + h + halo, lh), wx0, min(x0 + w + halo, lw))
        crops.append((y0 - wy0, x0 - wx0, h, w))
    out = fpn(windows)
    names = list(windows)
    feats = [out[n][:, :, a:a + h, b:b + w] for n, (a, b, h, w) in zip(names, crops)]
    if fpn.extra_blocks is not None:
        inputs = [windows[n][:, :, a:a + h, b:b + w] for n, (a, b, h, w) in zip(names, crops)]
        feats, names = fpn.extra_blocks(feats, inputs, names)
    return OrderedDict(zip(names, feats))


def _detect_tile(model: nn.Module, features: OrderedDict[str, torch.Tensor], tile: Tile) -> dict[str, torch.Tensor]:
    """The model's RPN and RoI heads on one tile's features: detections in tile pixels, masks box-relative."""
    device = features["0"].device
    # the heads read only the batch tensor's size, dtype and device: a broadcast scalar stands for the tile
    batch = torch.zeros((), device=device).expand(1, 3, tile.height, tile.width)
    images = ImageList(batch, [tile.valid])
    proposals, _ = model.rpn(images, features)
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    return detections[0]


def in_core(boxes: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Whether each box's centre lies in its core (rows of ``cores``: cy0, cy1, cx0, cx1; half-open)."""
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2).double().cpu()
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2).double().cpu()
    cores = cores.expand(boxes.shape[0], 4)
    return (cy >= cores[:, 0]) & (cy < cores[:, 1]) & (cx >= cores[:, 2]) & (cx < cores[:, 3])


def merge_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, tile_ids: torch.Tensor,
                     tiles: Sequence[Tile], iou_thresh: float, ios_thresh: float = CROSS_TILE_IOS) -> torch.Tensor:
    """Indices (by decreasing score) of the detections kept across ``tiles``: those whose box centre lies in the
    core of the tile that reported them, then a greedy class-wise suppression between detections of neighbouring
    tiles: a detection goes when a kept, higher-scoring one of the same class from another tile overlaps it at IoU
    > ``iou_thresh`` (the model's NMS rule) or covers more than ``ios_thresh`` of the smaller box (intersection over
    the smaller: two estimates of one object seen by two tiles). Pairs from one tile are left as the model's own
    NMS left them. Neighbours are the 8 around a tile in the grid, the only ones whose cores' boxes can meet."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    boxes, scores, labels, tile_ids = boxes.cpu().double(), scores.cpu(), labels.cpu(), tile_ids.cpu()
    idx = in_core(boxes, torch.tensor([t.core for t in tiles], dtype=torch.float64)[tile_ids]).nonzero()[:, 0]
    idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
    if len(tiles) == 1:
        return idx
    rows = {y: i for i, y in enumerate(sorted({t.y0 for t in tiles}))}
    cols = {x: i for i, x in enumerate(sorted({t.x0 for t in tiles}))}
    where = {(rows[t.y0], cols[t.x0]): k for k, t in enumerate(tiles)}
    members = {k: idx[tile_ids[idx] == k] for k in range(len(tiles))}
    rank = torch.empty(boxes.shape[0], dtype=torch.int64)
    rank[idx] = torch.arange(idx.numel())
    pairs = []
    for (r, c), k in where.items():
        for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each neighbouring pair once
            t = where.get((r + dr, c + dc))
            a, b = members[k], members.get(t, idx[:0])
            if a.numel() == 0 or b.numel() == 0:
                continue
            inter = _intersection(boxes[a], boxes[b])
            area_a, area_b = _area(boxes[a]), _area(boxes[b])
            iou = inter / (area_a[:, None] + area_b[None] - inter).clamp_min(1e-12)
            ios = inter / torch.minimum(area_a[:, None], area_b[None]).clamp_min(1e-12)
            same = labels[a][:, None] == labels[b][None]
            i, j = (same & ((iou > iou_thresh) | (ios > ios_thresh))).nonzero(as_tuple=True)
            pairs.append(torch.stack([a[i], b[j]], 1))
    if not pairs or sum(p.shape[0] for p in pairs) == 0:
        return idx
    pairs = torch.cat(pairs)
    first = torch.where(rank[pairs[:, 0]] < rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])  # the higher-scoring one
    second = pairs[:, 0] + pairs[:, 1] - first
    suppressors: dict[int, list[int]] = {}
    for f, g in zip(first.tolist(), second.tolist()):
        suppressors.setdefault(g, []).append(f)
    dropped: set[int] = set()
    for i in sorted(suppressors, key=lambda d: int(rank[d])):  # in score order: only kept detections suppress
        if any(f not in dropped for f in suppressors[i]):
            dropped.add(i)
    if not dropped:
        return idx
    return idx[~torch.isin(idx, torch.tensor(sorted(dropped), dtype=torch.int64))]


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (rb - lt).clamp_min(0).prod(-1)


# ----------------------------------------------------------------------------- the detector


class _GreyView:
    """A grey backbone's input as a lazy (H, W, 1) float32 array: the mean over the RGB channels of the normalised
    image, row band by row band (what :class:`~xcit.detect.model.XCiTFPN` gives a ``in_chans=1`` trunk)."""

    def __init__(self, image, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image = image
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.shape = (image.shape[0], image.shape[1], 1)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        rows = key[0] if isinstance(key, tuple) else key
        band = torch.from_numpy(np.ascontiguousarray(self.image[rows])).float().div(255)
        x = (band - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)
        out = x.mean(dim=-1, keepdim=True).numpy()
        return out[(slice(None), *key[1:])] if isinstance(key, tuple) else out


def check_image(image: Any, body: nn.Module, name: str | None = None) -> tuple[int, int]:
    """(H, W) of a uint8 (H, W, 3) image the detector can take, else a one-line ``ValueError`` naming ``name``."""
    where = f" in {name}" if name else ""
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 3 or shape[2] != 3 or np.dtype(getattr(image, "dtype", None)) != np.uint8:
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image{where}, got {dtype} of shape {shape}")
    least = body.patch_size
    if min(shape[:2]) < least:
        raise ValueError(f"expected an image of at least {least}x{least} pixels (one patch of the backbone){where}, "
                         f"got {shape[0]}x{shape[1]}")
    return shape[0], shape[1]


def check_tiling(tile: int | None, overlap: int) -> None:
    """One-line ``ValueError`` unless ``tile`` (None: one tile) and ``overlap`` fit the stride-32 grid."""
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE or tile % ALIGN):
        raise ValueError(f"expected a tile side that is a multiple of {ALIGN} and at least {MIN_TILE} pixels, "
                         f"got {tile!r}")
    limit = tile if tile is not None else math.inf
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % ALIGN or overlap >= limit:
        raise ValueError(f"expected an overlap that is a multiple of {ALIGN} pixels, >= 0 and smaller than the tile "
                         f"({tile}), got {overlap!r}")


@torch.no_grad()
def detect_large(model: nn.Module, image: Any, *, tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 tokens_per_chunk: int | None = None, max_resident_bytes: int | None = None,
                 budget_area: int | None = None, name: str | None = None, progress: bool = False,
                 merge: bool = True) -> LargeDetections:
    """Detections of ``model`` (eval mode) on ``image``, a uint8 (H, W, 3) array-like, in tiles (module docstring).

    ``tile`` / ``overlap`` in pixels (multiples of 32; ``tile=None``: one tile, ``model([image])``'s result);
    ``tokens_per_chunk`` and ``max_resident_bytes`` bound the streaming backbone's memory
    (:func:`~xcit.inference.dense.stream_pyramid`); ``budget_area`` overrides :func:`reference_area`; ``name``
    (the file) goes into error messages; ``progress`` shows a progress bar over the tiles; ``merge=False``
    returns every tile's detections unmerged, with ``tile_ids`` (for :func:`merge_detections` and its studies).
    """
    from ..inference.dense import DEFAULT_RESIDENT_BYTES, stream_pyramid
    from ..inference.streaming import DEFAULT_TOKENS_PER_CHUNK

    if model.training:
        raise ValueError("expected the detector in eval mode (model.eval(); load_detector returns it so)")
    backbone = model.backbone
    if not isinstance(backbone, XCiTFPN):
        raise ValueError(f"expected a detector on the XCiT pyramid (XCiTFPN backbone), got {type(backbone).__name__}")
    check_tiling(tile, overlap)
    height, width = check_image(image, backbone.body, name)
    align = max(ALIGN, model.transform.size_divisible)
    tiles = plan_tiles(height, width, tile, overlap, align)
    hp, wp = tiles[-1].y0 + tiles[-1].height, tiles[-1].x0 + tiles[-1].width
    mean, std = model.transform.image_mean, model.transform.image_std
    grey = backbone.body.in_chans == 1
    stream = stream_pyramid(backbone.body, None if grey else mean, None if grey else std,
                            tokens_per_chunk or DEFAULT_TOKENS_PER_CHUNK,
                            DEFAULT_RESIDENT_BYTES if max_resident_bytes is None else max_resident_bytes)
    source = _GreyView(image, mean, std) if grey else image
    start = time.perf_counter()
    found: list[dict[str, torch.Tensor]] = []
    with stream.maps(source, pad_to=(hp, wp)) as maps:
        trunk = time.perf_counter() - start
        bar = progress_bar(len(tiles), f"detect {name}" if name else "detect", progress)
        bar.unit = "tile"
        for k, t in enumerate(tiles):
            budgets = None if len(tiles) == 1 else tile_budgets(model, t.valid[0] * t.valid[1], budget_area)
            with using_budgets(model, budgets):
                det = _detect_tile(model, tile_features(backbone.fpn, maps, t), t)
            det = {key: v.cpu() for key, v in det.items()}
            det["boxes"] = det["boxes"] + torch.tensor([t.x0, t.y0, t.x0, t.y0], dtype=det["boxes"].dtype)
            if merge:  # the core rule now (it looks at one tile only): what no tile owns is not kept in memory
                owned = in_core(det["boxes"], torch.tensor(t.core, dtype=torch.float64)[None])
                det = {key: v[owned] for key, v in det.items()}
            det["tile_ids"] = torch.full((det["scores"].numel(),), k, dtype=torch.int64)
            found.append(det)
            bar.update(1)
        bar.close()
    cat = {key: torch.cat([d[key] for d in found]) for key in found[0]}
    if merge:
        keep = merge_detections(cat["boxes"], cat["scores"], cat["labels"], cat["tile_ids"], tiles,
                                model.roi_heads.nms_thresh)
    else:
        keep = torch.arange(cat["scores"].numel())
    return LargeDetections(cat["boxes"][keep], cat["scores"][keep], cat["labels"][keep],
                           cat["masks"][keep] if "masks" in cat else None, cat["tile_ids"][keep], tiles,
                           (height, width), {"backbone": trunk, "tiles": time.perf_counter() - start - trunk})


# ----------------------------------------------------------------------------- outputs


def patch_rle(patch: np.ndarray, ya: int, xa: int, size: tuple[int, int]) -> dict[str, Any]:
    """COCO compressed RLE ({"size", "counts"}) of an image-``size`` mask that is ``patch`` (bool (h, w)) at rows
    ``ya``.., columns ``xa``.. and empty elsewhere, computed from the patch's runs alone (no full-image mask)."""
    from pycocotools import mask as mask_utils

    h, w = size
    padded = np.zeros((patch.shape[0] + 2, patch.shape[1]), np.int8)
    padded[1:-1] = patch
    cols_s, rows_s = np.nonzero(np.diff(padded, axis=0).T == 1)  # column-major order, as COCO's RLE
    cols_e, rows_e = np.nonzero(np.diff(padded, axis=0).T == -1)
    starts = (xa + cols_s).astype(np.int64) * h + ya + rows_s
    ends = (xa + cols_e).astype(np.int64) * h + ya + rows_e
    if starts.size > 1:  # a run reaching the bottom row continues at the top of the next column
        joined = np.nonzero(ends[:-1] == starts[1:])[0]
        starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
    edges = np.empty(2 * starts.size + 2, np.int64)
    edges[0], edges[1:-1:2], edges[2:-1:2], edges[-1] = 0, starts, ends, h * w
    counts = np.diff(edges)
    if counts.size > 1 and counts[-1] == 0:  # a mask reaching the last pixel ends on a run of ones, as COCO's do
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def coco_results(found: LargeDetections, image_id: Any, label_to_cat: dict[int, int],
                 mask_threshold: float = 0.5) -> list[dict]:
    """COCO result entries of ``found`` (bbox, score, category; RLE ``segmentation`` for masks >= ``mask_threshold``,
    pasted box by box), as :func:`~xcit.detect.evaluation.to_coco_results` gives them for a model's output."""
    results = to_coco_results(found.output(), image_id, label_to_cat, masks=False)
    if found.masks is not None:
        empty = patch_rle(np.zeros((0, 0), bool), 0, 0, found.image_size)
        for r in results:
            r["segmentation"] = empty
        for i, ya, _, xa, _, probs in found.mask_patches():
            results[i]["segmentation"] = patch_rle((probs >= mask_threshold).numpy(), ya, xa, found.image_size)
    return results


def to_geojson(found: LargeDetections, georef: Any, classes: Sequence[str]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the boxes as polygons in the map coordinates of ``georef`` (an
    :class:`xcit.data.slides.GeoReference` of the level detected on), with score, label and class index."""
    from ..data.slides import pixel_to_map

    b = found.boxes.double().numpy()
    xs, ys = b[:, [0, 2, 2, 0, 0]], b[:, [1, 1, 3, 3, 1]]  # corners in pixel edges, as the transform counts them
    mx, my = pixel_to_map(georef, xs, ys)
    features = []
    for i, (s, c) in enumerate(zip(found.scores.tolist(), found.labels.tolist())):
        features.append({"type": "Feature", "id": i + 1,
                         "geometry": {"type": "Polygon", "coordinates": [np.stack([mx[i], my[i]], 1).tolist()]},
                         "properties": {"score": round(s, 5), "label": classes[c - 1] if 0 < c <= len(classes) else
                                        str(c), "class_index": c}})
    out: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if georef.crs:
        out["crs"] = {"type": "name", "properties": {"name": georef.crs}}  # the 2008 form: RFC 7946 assumes WGS 84
    return out


def draw_large_overlay(image: Any, found: LargeDetections, classes: list[str], score_thresh: float = 0.5,
                       max_side: int | None = None):
    """A PIL image: the overview of the slide level ``image`` (:func:`xcit.data.slides.read_overview`) with the boxes
    scoring >= ``score_thresh`` (labelled when there are at most 200 of them), drawn by
    :func:`xcit.detect.predict.draw_overlay`."""
    from ..data.slides import OVERVIEW_SIDE, read_overview
    from .predict import draw_overlay

    small = read_overview(image, max_side or OVERVIEW_SIDE)
    shown = found.above(score_thresh)
    sy, sx = small.shape[0] / image.shape[0], small.shape[1] / image.shape[1]
    boxes = shown.boxes * torch.tensor([sx, sy, sx, sy], dtype=shown.boxes.dtype)
    output = {"boxes": boxes, "scores": shown.scores, "labels": shown.labels}
    return draw_overlay(torch.from_numpy(small).permute(2, 0, 1), output, classes, score_thresh,
                        labels=len(shown) <= 200, line_width=max(1, round(max(small.shape[:2]) / 1000)))


def large_prediction_files(stem: str, georeferenced: bool, overlay: bool = True) -> list[str]:
    """The names :func:`predict_large_file` writes for an image of output name ``stem``."""
    return [f"{stem}_predictions.json", *([f"{stem}.geojson"] if georeferenced else []),
            *([f"{stem}_overlay.png"] if overlay else [])]


def open_large(path: str | os.PathLike, level: int | None = None, mpp: float | None = None) -> Any:
    """The image at ``path`` as a lazy uint8 (H, W, 3) array with its ``georef`` (None where not georeferenced): a
    :class:`xcit.data.slides.SlideLevel` (a pyramid ``level``, or the one nearest ``mpp`` microns per pixel). Close it
    when done."""
    from ..data.slides import open_slide

    return open_slide(path, level, mpp, in_chans=3)


def predict_large_file(model: nn.Module, meta: dict, path: str | os.PathLike, out: str | os.PathLike, *,
                       tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, score_thresh: float = 0.5,
                       level: int | None = None, mpp: float | None = None, tokens_per_chunk: int | None = None,
                       max_resident_bytes: int | None = None, georef: Any = None, stem: str | None = None,
                       overlay: bool = True, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Detect objects in one large image file (a slide ``level``, or the one nearest ``mpp``) and write, into folder
    ``out``, all files or none:

    * ``STEM_predictions.json``: COCO (images, categories, annotations with bbox, score, category_id, area, and RLE
      ``segmentation`` for Mask R-CNN) of the detections scoring >= ``score_thresh``, plus the tiling used;
    * ``STEM.geojson`` when the level is georeferenced (``georef``, a :class:`xcit.data.slides.GeoReference`,
      overrides the file's): the boxes as polygons in map coordinates with score and label;
    * ``STEM_overlay.png`` (unless ``overlay=False``): the boxes on an overview of longer side 2048.

    STEM is the file's stem unless given. Existing outputs are refused before any work unless ``overwrite``; an
    unreadable or unsuitable image is a one-line ``ValueError`` naming the file. Returns a summary dict.
    """
    if not (isinstance(score_thresh, (int, float)) and 0.0 <= score_thresh <= 1.0):
        raise ValueError(f"expected a score threshold in [0, 1] (scores are probabilities), got {score_thresh!r}")
    check_tiling(tile, overlap)
    path = Path(path)
    stem = stem or path.stem
    claim_files(out, large_prediction_files(stem, False, overlay), overwrite=overwrite)  # before reading the image
    with open_large(path, level, mpp) as image:
        check_image(image, model.backbone.body, display_path(path))
        georef = georef if georef is not None else image.georef
        targets = claim_files(out, large_prediction_files(stem, georef is not None, overlay), overwrite=overwrite)
        n = model.roi_heads.box_predictor.cls_score.out_features - 1
        classes = list(meta.get("classes") or [f"class{i}" for i in range(1, n + 1)])
        category_ids = list(meta.get("category_ids") or range(1, n + 1))
        found = detect_large(model, image, tile=tile, overlap=overlap, tokens_per_chunk=tokens_per_chunk,
                             max_resident_bytes=max_resident_bytes, name=display_path(path), progress=progress)
        kept = found.above(score_thresh)
        height, width = found.image_size
        detections = coco_results(kept, 1, {i + 1: c for i, c in enumerate(category_ids)})
        for i, det in enumerate(detections, start=1):
            det.update(id=i, area=round(det["bbox"][2] * det["bbox"][3], 2), iscrowd=0)
        tiling = {"tile": tile, "overlap": overlap, "tiles": len(found.tiles), "level": image.level, "mpp": image.mpp,
                  "score_thresh": score_thresh, "seconds": {k: round(v, 2) for k, v in found.seconds.items()}}
        coco = {"images": [{"id": 1, "file_name": display_path(path), "height": height, "width": width}],
                "annotations": detections,
                "categories": [{"id": c, "name": name} for c, name in zip(category_ids, classes)], "tiling": tiling}
        writers = [atomic_write(t) for t in targets]
        try:  # everything is written beside its target first, then renamed into place
            temps = iter([w.begin() for w in writers])
            next(temps).write_text(json.dumps(coco))
            if georef is not None:
                next(temps).write_text(json.dumps(to_geojson(kept, georef, classes)))
            if overlay:
                draw_large_overlay(image, kept, classes, score_thresh).save(next(temps), format="PNG")
        except BaseException:
            for w in writers:
                w.discard()
            raise
    for k, w in enumerate(writers):
        try:
            w.commit()
        except BaseException:
            for rest in writers[k + 1:]:
                rest.discard()
            raise
    return {"image": display_path(path), "height": height, "width": width, "tiles": len(found.tiles),
            "detections": len(kept), "files": [str(t) for t in targets], "seconds": dict(found.seconds)}
