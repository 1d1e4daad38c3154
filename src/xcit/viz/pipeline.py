"""Image file -> attention figures: the pipeline behind ``xcit attention``."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from ..data.images import load_image
from ..inference.loading import InferenceModel
from .attention import AttentionMaps, forward_with_attention
from .plot import channel_attention_figure, class_attention_figure, save_png, to_display


def keep_aspect_transform(short_side: int | None, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the short side to ``short_side`` (bicubic, aspect kept, no crop; None: native size), normalise."""
    steps: list = [v2.ToImage()]
    if short_side:
        if short_side < 1:
            raise ValueError(f"expected a positive short side in pixels, got {short_side}")
        steps.append(v2.Resize(short_side, interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


@dataclass
class AttentionResult:
    """One image's attention, its model input and the figures written."""

    path: str
    input: torch.Tensor  # (C, H, W), normalised
    maps: AttentionMaps  # batch of one
    top: list[tuple[str, float]]
    figures: list[Path]


def _unique_stem(path: Path, taken: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in taken:
        k += 1
        stem = f"{path.stem}_{k}"
    taken.add(stem)
    return stem


def render_attention(
    inf: InferenceModel,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    short_side: int | None = None,
    cls_layer: int = -1,
    xca_blocks: Sequence[int] = (),
    renormalise: bool = True,
    cmap: str = "inferno",
    alpha: float = 0.6,
    dpi: int = 100,
    palette: bool = False,
    device: str | torch.device = "cpu",
    on_error=None,
):
    """For each image: ``<stem>_attention.png`` (input + per-head class attention) and one
    ``<stem>_xca<block>.png`` per requested XCA block. Yields an :class:`AttentionResult` per
    readable image; unreadable ones are passed to ``on_error(path, message)`` (or raise if None).
    """
    out = Path(out_dir)
    transform = keep_aspect_transform(short_side, inf.mean, inf.std)
    taken: set[str] = set()
    model = inf.model
    label = (inf.source if inf.random_init else Path(inf.source).name) + (f" [{inf.dataset}]" if inf.dataset else "")
    for path in paths:
        path = Path(path)
        try:
            x = transform(load_image(path, inf.in_chans))
        except ValueError as err:
            if on_error is None:
                raise
            on_error(str(path), str(err))
            continue
        with torch.no_grad():
            maps = forward_with_attention(model, x[None].to(device), cls_layer, xca_blocks, renormalise)
        probs = maps.logits.float().softmax(-1)[0]
        p, i = probs.max(0)
        top = [(inf.classes[int(i)], float(p))]
        stem = _unique_stem(path, taken)
        h, w = x.shape[-2:]
        overlays = maps.upsampled((h, w))[0].cpu().numpy()
        kind = "renormalised over patches" if renormalise else "raw softmax weights"
        title = (
            f"{path.name} ({w}x{h} px, {maps.grid[1]}x{maps.grid[0]} patches) - class attention of layer "
            f"{maps.cls_layer} (of 0..{len(model.cls_attn_blocks) - 1}), {kind}\n"
            f"{label} - top-1: {top[0][0]} ({100 * top[0][1]:.1f}%)"
        )
        fig = class_attention_figure(to_display(x, inf.mean, inf.std), overlays, title=title, cmap=cmap, alpha=alpha)
        figures = [save_png(fig, out / f"{stem}_attention.png", dpi=dpi, palette=palette)]
        for b, attn in maps.xca.items():
            d = attn.shape[-1]
            fig = channel_attention_figure(
                attn[0].float().cpu().numpy(),
                title=f"{path.name} - XCA channel attention, block {b} (of 0..{len(model.blocks) - 1}), {d}x{d} per head",
            )
            figures.append(save_png(fig, out / f"{stem}_xca{b}.png", dpi=dpi, palette=palette))
        yield AttentionResult(str(path), x, maps, top, figures)
