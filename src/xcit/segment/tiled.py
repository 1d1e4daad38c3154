"""Segmentation of images of any size, tile by tile, equal to the whole-image forward.

The backbone's pyramid comes from :func:`xcit.inference.dense.stream_pyramid` (exact global XCA statistics, any
window of any level). The heads are run on windows of the levels: every operation of Semantic FPN and UperNet is
local (1x1 / 3x3 convolutions, BatchNorm, ReLU, bilinear / nearest resizing, sums and concatenations) except
UperNet's pyramid pooling, whose global pools are taken in a first pass over the whole stride-32 level (small: 1/1024
of the image's pixels). A :class:`Window` is a tensor holding an exact part of a global map; each operation returns the
part of its output that its input determines (a 3x3 convolution loses a cell on each side not at the image border,
a resize keeps the outputs whose taps are inside), so a tile computed from a large enough window of the backbone is
exact. The margin ("halo") is found by growing it until the output covers the tile.

Entry points: :func:`segment_tiles` (logits or labels per tile, for any consumer) and :func:`segment_large`
(the whole label map; logits too for small images, which tests use).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..inference.dense import PyramidMaps, StreamingPyramid, spatial_size, stream_pyramid
from .heads import ConvNormAct, Segmenter, SemanticFPNHead, UperNetHead

#: Default output tile side in pixels (a multiple of every pyramid stride).
DEFAULT_TILE = 2048


@dataclass
class Window:
    """``t`` (B, C, h, w) equals rows [y, y + h) and columns [x, x + w) of a global map of size (H, W)."""

    t: torch.Tensor
    y: int
    x: int
    H: int
    W: int

    @property
    def rows(self) -> tuple[int, int]:
        return self.y, self.y + self.t.shape[-2]

    @property
    def cols(self) -> tuple[int, int]:
        return self.x, self.x + self.t.shape[-1]

    def map(self, fn) -> Window:
        """A pointwise operation (BatchNorm, ReLU, 1x1 convolution, dropout in eval)."""
        return Window(fn(self.t), self.y, self.x, self.H, self.W)

    def crop(self, rows: tuple[int, int], cols: tuple[int, int]) -> Window:
        (r0, r1), (c0, c1) = rows, cols
        if r0 < self.rows[0] or r1 > self.rows[1] or c0 < self.cols[0] or c1 > self.cols[1]:
            raise AssertionError(f"crop {rows} x {cols} outside the window {self.rows} x {self.cols}")
        return Window(self.t[:, :, r0 - self.y:r1 - self.y, c0 - self.x:c1 - self.x], r0, c0, self.H, self.W)


def conv(win: Window, layer: nn.Conv2d) -> Window:
    """A stride-1 'same' convolution: zero padding where the window meets the map's border, else the window shrinks."""
    k, p = layer.kernel_size, layer.padding
    if layer.stride != (1, 1) or layer.dilation != (1, 1) or k[0] != 2 * p[0] + 1 or k[1] != 2 * p[1] + 1:
        raise ValueError(f"expected stride-1 'same' convolutions in the head, got {layer}")
    (r0, r1), (c0, c1) = win.rows, win.cols
    top, bottom = (p[0] if r0 == 0 else 0), (p[0] if r1 == win.H else 0)
    left, right = (p[1] if c0 == 0 else 0), (p[1] if c1 == win.W else 0)
    t = win.t
    if t.shape[-2] + top + bottom < k[0] or t.shape[-1] + left + right < k[1]:
        raise _TooSmall()
    if top or bottom or left or right:
        t = F.pad(t, (left, right, top, bottom))
    out = F.conv2d(t, layer.weight, layer.bias, 1, 0, 1, layer.groups)
    return Window(out, r0 + p[0] - top, c0 + p[1] - left, win.H, win.W)


def conv_norm_act(win: Window, block: ConvNormAct) -> Window:
    layer, *pointwise = block
    out = conv(win, layer)
    for m in pointwise:
        out = out.map(m)
    return out


def intersect(*wins: Window) -> list[Window]:
    """The windows cropped to their common rectangle."""
    r0, r1 = max(w.rows[0] for w in wins), min(w.rows[1] for w in wins)
    c0, c1 = max(w.cols[0] for w in wins), min(w.cols[1] for w in wins)
    if r1 <= r0 or c1 <= c0:
        raise _TooSmall()
    return [w.crop((r0, r1), (c0, c1)) for w in wins]


def add(a: Window, b: Window) -> Window:
    a, b = intersect(a, b)
    return Window(a.t + b.t, a.y, a.x, a.H, a.W)


def cat(wins: Sequence[Window]) -> Window:
    wins = intersect(*wins)
    first = wins[0]
    return Window(torch.cat([w.t for w in wins], dim=1), first.y, first.x, first.H, first.W)


def resize(win: Window, size: tuple[int, int], mode: str, scale: float | None = None,
           want: tuple[tuple[int, int], tuple[int, int]] | None = None) -> Window:
    """``F.interpolate(map, size, mode, align_corners=False)`` (or ``scale_factor=scale``) restricted to the outputs
    whose taps lie in ``win`` (and to ``want``'s rows / columns when given); the identity when the size is unchanged."""
    if scale is None and tuple(size) == (win.H, win.W):
        return win if want is None else win.crop(*_clip(want, win))
    factor = _integer_factor(win, size, mode, scale)
    if factor:
        return _upsample_by(win, factor, mode, want)
    rows = _taps(win.H, size[0], mode, scale)
    cols = _taps(win.W, size[1], mode, scale)
    (r0, r1), (c0, c1) = win.rows, win.cols
    ro = _covered(rows, r0, r1, None if want is None else want[0])
    co = _covered(cols, c0, c1, None if want is None else want[1])
    t = win.t
    t = _blend(t, cols, co, c0, dim=-1)
    t = _blend(t, rows, ro, r0, dim=-2)
    return Window(t, ro[0], co[0], size[0], size[1])


def _integer_factor(win: Window, size: tuple[int, int], mode: str, scale: float | None) -> int:
    """u when the resize takes (H, W) to exactly (u H, u W) for an integer u >= 2 (then F.interpolate can run on the
    window itself), else 0."""
    u = size[0] // win.H
    if u < 2 or tuple(size) != (u * win.H, u * win.W) or (scale is not None and scale != u):
        return 0
    return u if mode in ("bilinear", "nearest") else 0


def _upsample_by(win: Window, u: int, mode: str, want) -> Window:
    """An integer-factor resize of a window: ``F.interpolate`` on it gives the global map's values except for the
    outputs next to a side inside the map (whose taps fall outside the window, clamped): ``u // 2`` of them are
    dropped there (bilinear; nearest needs no drop)."""
    (r0, r1), (c0, c1) = win.rows, win.cols
    if want is not None:  # only the input cells the wanted outputs read
        (a, b), (c, d) = want
        r0, r1 = max(r0, a // u - 1), min(r1, (b - 1) // u + 2)
        c0, c1 = max(c0, c // u - 1), min(c1, (d - 1) // u + 2)
        if r1 <= r0 or c1 <= c0:
            raise _TooSmall()
        win = win.crop((r0, r1), (c0, c1))
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    t = F.interpolate(win.t, scale_factor=float(u), mode=mode, **kwargs)
    out = Window(t, u * r0, u * c0, u * win.H, u * win.W)
    drop = u // 2 if mode == "bilinear" else 0
    rows = (u * r0 + (drop if r0 > 0 else 0), u * r1 - (drop if r1 < win.H else 0))
    cols = (u * c0 + (drop if c0 > 0 else 0), u * c1 - (drop if c1 < win.W else 0))
    if want is not None:
        rows, cols = (max(rows[0], want[0][0]), min(rows[1], want[0][1])), (max(cols[0], want[1][0]),
                                                                              min(cols[1], want[1][1]))
    if rows[1] <= rows[0] or cols[1] <= cols[0]:
        raise _TooSmall()
    return out.crop(rows, cols)


def _blend(t: torch.Tensor, taps, span: tuple[int, int], origin: int, dim: int) -> torch.Tensor:
    """Outputs ``span`` along ``dim`` of a window starting at input index ``origin``, from their taps."""
    i0, i1, l0, l1 = (None if a is None else a[span[0]:span[1]] for a in taps)
    a = t.index_select(dim, torch.from_numpy(i0 - origin))
    if l0 is None:  # nearest
        return a
    b = t.index_select(dim, torch.from_numpy(i1 - origin))
    shape = (-1, 1) if dim == -2 else (-1,)
    w0 = torch.from_numpy(l0).to(t.dtype).view(shape)
    w1 = torch.from_numpy(l1).to(t.dtype).view(shape)
    return a * w0 + b * w1


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, mode: str, scale: float | None):
    """Per output index: the input indices read and their weights, computed as PyTorch's CPU kernels do (fp32)."""
    idx = np.arange(n_out, dtype=np.float32)
    ratio = np.float32(1.0 / scale) if scale is not None else np.float32(n_in) / np.float32(n_out)
    if mode == "nearest":
        if n_out == n_in:
            i0 = np.arange(n_out)
        elif n_out == 2 * n_in:
            i0 = np.arange(n_out) >> 1
        else:
            i0 = np.minimum(np.floor(idx * ratio).astype(np.int64), n_in - 1)
        return i0, i0, None, None
    if mode != "bilinear":
        raise ValueError(f"expected 'nearest' or 'bilinear' resizing, got {mode!r}")
    src = np.maximum(ratio * (idx + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = src.astype(np.int64)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    lam0 = (np.float32(1) - lam1).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam0, lam1


def _covered(taps, lo: int, hi: int, want: tuple[int, int] | None) -> tuple[int, int]:
    """The output range [a, b) whose taps all lie in input rows [lo, hi) (taps are monotonic), within ``want``."""
    i0, i1 = taps[0], taps[1]
    a = int(np.searchsorted(i0, lo, side="left"))
    b = int(np.searchsorted(i1, hi, side="left"))
    if want is not None:
        a, b = max(a, want[0]), min(b, want[1])
    if b <= a:
        raise _TooSmall()
    return a, b


def _clip(want, win: Window):
    (r0, r1), (c0, c1) = want
    return (max(r0, win.rows[0]), min(r1, win.rows[1])), (max(c0, win.cols[0]), min(c1, win.cols[1]))


class _TooSmall(Exception):
    """A window too small for the operation: the halo must grow."""


# ----- the heads on windows ------------------------------------------------------------------------------------------
def fpn_head(head: SemanticFPNHead, feats: list[Window]) -> Window:
    """:meth:`SemanticFPNHead.forward` on windows (stride-4 logits)."""
    neck = head.neck
    lat = [w.map(c) for c, w in zip(neck.lateral, feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = add(lat[i - 1], resize(lat[i], (lat[i - 1].H, lat[i - 1].W), "nearest"))
    pyramid = [conv(w, c) for c, w in zip(neck.output, lat)]
    sizes = [(p.H, p.W) for p in pyramid]
    out = None
    for level, (blocks, x) in enumerate(zip(head.scale_heads, pyramid)):
        for k, block in enumerate(blocks):
            x = conv_norm_act(x, block)
            if level > 0 and head.upsample == "x2":
                x = resize(x, (math.floor(x.H * 2.0), math.floor(x.W * 2.0)), "bilinear", scale=2.0)
            elif level > 0:
                x = resize(x, sizes[level - k - 1], "bilinear")
        out = x if out is None else add(out, resize(x, (out.H, out.W), "bilinear"))
    return out.map(head.classifier)


def upernet_pooled(head: UperNetHead, top: torch.Tensor) -> list[torch.Tensor]:
    """First pass: UperNet's pyramid-pooling branches on the whole stride-32 level (small maps, s x s each)."""
    return [branch(top) for branch in head.ppm.branches]


def upernet_head(head: UperNetHead, feats: list[Window], pooled: list[torch.Tensor]) -> Window:
    """:meth:`UperNetHead.forward` on windows, the pooled branches given (:func:`upernet_pooled`)."""
    *low, top = feats
    lat = [conv_norm_act(w, c) for c, w in zip(head.lateral, low)]
    ppm = [resize(Window(p, 0, 0, p.shape[-2], p.shape[-1]), (top.H, top.W), "bilinear", want=(top.rows, top.cols))
           for p in pooled]
    lat.append(conv_norm_act(cat([top, *ppm]), head.bottleneck))
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = add(lat[i - 1], resize(lat[i], (lat[i - 1].H, lat[i - 1].W), "bilinear"))
    outs = [conv_norm_act(w, c) for c, w in zip(head.fpn, lat[:-1])] + [lat[-1]]
    size = (outs[0].H, outs[0].W)
    fused = conv_norm_act(cat([resize(o, size, "bilinear") for o in outs]), head.fuse)
    return fused.map(head.classifier)


# ----- tiles ---------------------------------------------------------------------------------------------------------
@dataclass
class Tile:
    """Rows [y0, y1) and columns [x0, x1) of the image: labels (h, w) int64, and logits (C, h, w) when asked for."""

    y0: int
    y1: int
    x0: int
    x1: int
    labels: torch.Tensor
    logits: torch.Tensor | None = None


class TiledSegmenter:
    """A :class:`Segmenter` run tile by tile on the windowed pyramid (see the module docstring).

    ``tile`` is the output tile side in pixels; ``tokens_per_chunk`` and ``max_resident_bytes`` bound the streaming
    backbone (:func:`xcit.inference.dense.stream_pyramid`).
    """

    def __init__(self, model: Segmenter, mean: Sequence[float], std: Sequence[float], tile: int = DEFAULT_TILE,
                 tokens_per_chunk: int | None = None, max_resident_bytes: int | None = None,
                 rows_per_chunk: int = 256) -> None:
        if not isinstance(model, Segmenter):
            raise ValueError(f"expected a Segmenter, got {type(model).__name__}")
        if model.training:
            raise RuntimeError("tiled segmentation is for inference: call model.eval() first")
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 32 or tile % 32:
            raise ValueError(f"expected a tile side that is a positive multiple of 32 pixels, got {tile!r}")
        for m in model.decode_head.modules():
            if isinstance(m, nn.GroupNorm):
                raise ValueError("expected a head with BatchNorm (the official one): GroupNorm normalises over the "
                                 "whole map, which a tiled forward cannot do exactly; run the whole-image forward")
        self.model, self.tile, self.rows_per_chunk = model, tile, rows_per_chunk
        kwargs = {} if tokens_per_chunk is None else {"tokens_per_chunk": tokens_per_chunk}
        if max_resident_bytes is not None:
            kwargs["max_resident_bytes"] = max_resident_bytes
        self.stream: StreamingPyramid = stream_pyramid(model.backbone, mean, std, **kwargs)
        self.halo = 1  # patch-grid cells around a tile (see _find_halo)

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of the tiles of a ``height`` x ``width`` image, in the order :meth:`tiles` gives them."""
        return [(y0, min(y0 + self.tile, height), x0, min(x0 + self.tile, width))
                for y0 in range(0, height, self.tile) for x0 in range(0, width, self.tile)]

    @torch.no_grad()
    def tiles(self, image, logits: bool = False) -> Iterator[Tile]:
        """The image's tiles in row-major order (rows of tiles, each left to right)."""
        h, w = spatial_size(image)
        self.model.check_size(h, w)  # before the trunk runs
        maps = self.stream.maps(image)
        try:
            head = self.model.decode_head
            pooled = None
            if isinstance(head, UperNetHead):
                hh, ww = maps.sizes[-1]
                pooled = upernet_pooled(head, maps.window(len(maps.sizes) - 1, 0, hh, 0, ww))
            self._find_halo(maps, pooled)
            for y0, y1, x0, x1 in self.boxes(h, w):
                yield self._tile(maps, pooled, y0, y1, x0, x1, logits)
        finally:
            maps.close()

    def _tile(self, maps: PyramidMaps, pooled, y0: int, y1: int, x0: int, x1: int, logits: bool) -> Tile:
        while True:
            try:
                stride4 = self._head(maps, pooled, y0, y1, x0, x1)
                labels, out = self._upsample(stride4, maps.image_size, y0, y1, x0, x1, logits)
                return Tile(y0, y1, x0, x1, labels, out)
            except _TooSmall:
                if self.halo > max(maps.grid):
                    raise AssertionError("the tiled head's halo cannot grow further") from None
                self.halo += 1

    def _find_halo(self, maps: PyramidMaps, pooled) -> None:
        """The least halo that makes an interior 32 x 32 tile exact (tile edges are multiples of 32 pixels, so it
        serves every tile; a tile that still needs more grows it)."""
        h, w = maps.image_size
        y0, x0 = (h // 2) // 32 * 32, (w // 2) // 32 * 32
        self.halo = 1
        self._tile(maps, pooled, y0, min(y0 + 32, h), x0, min(x0 + 32, w), False)

    def _head(self, maps: PyramidMaps, pooled, y0: int, y1: int, x0: int, x1: int) -> Window:
        p = self.model.backbone.patch_size
        m = self.halo
        gy0, gy1 = y0 // p - m, -(-y1 // p) + m
        gx0, gx1 = x0 // p - m, -(-x1 // p) + m
        feats = []
        for level, stride in enumerate(maps.strides):
            lh, lw = maps.sizes[level]
            ry0, ry1 = max(gy0 * p // stride, 0), min(-(-gy1 * p // stride), lh)
            rx0, rx1 = max(gx0 * p // stride, 0), min(-(-gx1 * p // stride), lw)
            feats.append(Window(maps.window(level, ry0, ry1, rx0, rx1), ry0, rx0, lh, lw))
        head = self.model.decode_head
        return upernet_head(head, feats, pooled) if isinstance(head, UperNetHead) else fpn_head(head, feats)

    def _upsample(self, stride4: Window, size: tuple[int, int], y0: int, y1: int, x0: int, x1: int, logits: bool):
        """Labels (and logits) of the tile at image resolution, a band of rows at a time (150 classes x 2048^2 pixels
        of logits would take 2.5 GB)."""
        labels = torch.empty(y1 - y0, x1 - x0, dtype=torch.int64)
        out = torch.empty(stride4.t.shape[1], y1 - y0, x1 - x0) if logits else None
        for r in range(y0, y1, self.rows_per_chunk):
            r1 = min(r + self.rows_per_chunk, y1)
            band = resize(stride4, size, "bilinear", want=((r, r1), (x0, x1)))
            if band.rows != (r, r1) or band.cols != (x0, x1):
                raise _TooSmall()
            labels[r - y0:r1 - y0] = band.t[0].argmax(0)
            if out is not None:
                out[:, r - y0:r1 - y0] = band.t[0]
        return labels, out


@torch.no_grad()
def segment_large(model: Segmenter, image, mean: Sequence[float], std: Sequence[float], *, tile: int = DEFAULT_TILE,
                  logits: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (H, W) label map of one image (uint8 (H, W, C) array-like or (1, C, H, W) tensor), computed tile by tile,
    equal to ``model(x).argmax(1)``; with ``logits``, also the (classes, H, W) logits (for images that fit)."""
    tiler = TiledSegmenter(model, mean, std, tile, **kwargs)
    h, w = spatial_size(image)
    labels = torch.empty(h, w, dtype=torch.int64)
    out = torch.empty(model.num_classes, h, w) if logits else None
    for t in tiler.tiles(image, logits=logits):
        labels[t.y0:t.y1, t.x0:t.x1] = t.labels
        if out is not None:
            out[:, t.y0:t.y1, t.x0:t.x1] = t.logits
    return labels, out
