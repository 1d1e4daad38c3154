"""Class attention of a whole large image: the map at patch resolution and downsampled pictures of it.

The streaming forward (:func:`xcit.streaming`) gives the cls-to-patch attention over every patch of
the image at its native resolution. Written per image:

- ``<stem>_attention.npy``: (heads, Hp, Wp) float32, one value per ``patch_size`` x ``patch_size``
  pixels (the model's full resolution); open it with ``np.load(path, mmap_mode="r")``;
- ``<stem>_attention.png``: the per-head figure of ``xcit attention`` on a downsampled copy;
- ``<stem>_attention_map.png``: the mean over heads overlaid on the downsampled image, one pixel per
  pixel of the copy (long side ``thumbnail``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import display_path
from ..data.large_images import read_large_image
from ..data.outputs import atomic_write, claim_files
from ..inference.gigapixel import stream_model
from ..inference.loading import InferenceModel
from ..inference.streaming import DEFAULT_TOKENS_PER_CHUNK
from .plot import class_attention_figure, save_png


@dataclass
class LargeAttentionResult:
    path: str
    size: tuple[int, int]  # (H, W) pixels
    grid: tuple[int, int]  # (Hp, Wp) patches
    top: list[tuple[str, float]]
    files: list[Path]


def render_large_attention(
    inf: InferenceModel,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stem: str | None = None,
    cls_layer: int = -1,
    renormalise: bool = True,
    thumbnail: int = 2048,
    cmap: str = "inferno",
    alpha: float = 0.6,
    dpi: int = 100,
    palette: bool = False,
    tokens_per_chunk: int = DEFAULT_TOKENS_PER_CHUNK,
    overwrite: bool = False,
) -> LargeAttentionResult:
    """Class attention of one image at native resolution, written as described in the module docstring; files that
    exist are refused unless ``overwrite`` (before the image is read)."""
    if thumbnail < 1:
        raise ValueError(f"expected a positive thumbnail size in pixels, got {thumbnail}")
    stem = stem or Path(path).stem
    out_dir = Path(out_dir)
    claim_files(out_dir, large_attention_files(stem), overwrite=overwrite)
    pixels = read_large_image(path, inf.in_chans)
    stream = stream_model(inf, tokens_per_chunk)
    out = stream.run(pixels, attention_layer=cls_layer)
    maps = out.attention[0].float()
    if renormalise:
        maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    maps = maps.cpu().numpy()
    npy = out_dir / f"{stem}_attention.npy"
    with atomic_write(npy) as tmp:
        stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=maps.shape)
        stored[:] = maps
        stored.flush()
        del stored

    h, w = pixels.shape[:2]
    step = max(1, math.ceil(max(h, w) / thumbnail))
    image = np.array(pixels[::step, ::step], dtype=np.float32) / 255
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    p = stream.model.patch_size
    # each thumbnail pixel shows the patch its source pixel belongs to
    overlays = maps[:, (np.arange(0, h, step) // p)[:, None], (np.arange(0, w, step) // p)[None, :]]

    probs = out.logits.float().softmax(-1)[0]
    prob, idx = probs.max(0)
    top = [(inf.classes[int(idx)], float(prob))]
    kind = "renormalised over patches" if renormalise else "raw softmax weights"
    layer = cls_layer % len(stream.model.cls_attn_blocks)
    title = (f"{display_path(Path(path).name)} ({w}x{h} px, {out.grid[1]}x{out.grid[0]} patches, shown 1:{step}) - "
             "class attention "
             f"of layer {layer}, {kind}\ntop-1: {top[0][0]} ({100 * top[0][1]:.1f}%)")
    fig = class_attention_figure(image, overlays, title=title, cmap=cmap, alpha=alpha)
    files = [npy, save_png(fig, out_dir / f"{stem}_attention.png", dpi=dpi, palette=palette)]
    files.append(_overlay_png(image, overlays.mean(axis=0), out_dir / f"{stem}_attention_map.png", cmap, alpha))
    return LargeAttentionResult(os.fspath(path), (h, w), out.grid, top, files)


def _overlay_png(image: np.ndarray, heat: np.ndarray, path: Path, cmap: str, alpha: float) -> Path:
    """``heat`` (min-max scaled, coloured by ``cmap``) blended over ``image`` at the image's resolution."""
    from matplotlib import colormaps
    from PIL import Image

    span = float(heat.max() - heat.min())
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colour = colormaps[cmap](scaled)[..., :3]
    blended = (1 - alpha) * image + alpha * colour
    with atomic_write(path) as tmp:
        Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8)).save(tmp, format="PNG", optimize=True)
    return path


def large_attention_files(stem: str) -> list[str]:
    """The names :func:`render_large_attention` writes for an image of output name ``stem``."""
    return [f"{stem}_attention.npy", f"{stem}_attention.png", f"{stem}_attention_map.png"]
