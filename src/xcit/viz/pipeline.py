"""Image file -> attention figures: the pipeline behind ``xcit attention``."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from ..data.images import display_path, load_image
from ..data.outputs import claim_files, unique_stems
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


def attention_files(stem: str, xca_blocks: Sequence[int] = ()) -> list[str]:
    """The names :func:`render_attention` writes for one image of output name ``stem`` (``xca_blocks`` as
    non-negative indices)."""
    return [f"{stem}_attention.png", *(f"{stem}_xca{b}.png" for b in xca_blocks)]


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
    stems: Sequence[str] | None = None,
    overwrite: bool = False,
):
    """For each image: ``<stem>_attention.png`` (input + per-head class attention) and one
    ``<stem>_xca<block>.png`` per requested XCA block. Yields an :class:`AttentionResult` per
    readable image; unreadable ones are passed to ``on_error(path, message)`` (or raise if None).

    ``stems`` are the output names (default :func:`xcit.data.outputs.unique_stems`: distinct also for
    ``a.png`` and ``a.jpg``). Before the first image, every file to be written is checked: one that
    exists is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    transform = keep_aspect_transform(short_side, inf.mean, inf.std)
    model = inf.model
    paths = list(paths)
    stems = unique_stems(paths) if stems is None else list(stems)
    if len(stems) != len(paths):
        raise ValueError(f"expected one output name per image, got {len(stems)} for {len(paths)}")
    depth = len(model.blocks)
    blocks = [b % depth if -depth <= b < depth else b for b in xca_blocks]  # out-of-range ones are refused below
    claim_files(out, [n for stem in stems for n in attention_files(stem, blocks)], overwrite=overwrite)
    label = (inf.source if inf.random_init else Path(inf.source).name) + (f" [{inf.dataset}]" if inf.dataset else "")
    for path, stem in zip(paths, stems):
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
        h, w = x.shape[-2:]
        overlays = maps.upsampled((h, w))[0].cpu().numpy()
        kind = "renormalised over patches" if renormalise else "raw softmax weights"
        title = (
            f"{display_path(path.name)} ({w}x{h} px, {maps.grid[1]}x{maps.grid[0]} patches) - class attention of layer "
            f"{maps.cls_layer} (of 0..{len(model.cls_attn_blocks) - 1}), {kind}\n"
            f"{label} - top-1: {top[0][0]} ({100 * top[0][1]:.1f}%)"
        )
        fig = class_attention_figure(to_display(x, inf.mean, inf.std), overlays, title=title, cmap=cmap, alpha=alpha)
        figures = [save_png(fig, out / f"{stem}_attention.png", dpi=dpi, palette=palette)]
        for b, attn in maps.xca.items():
            d = attn.shape[-1]
            fig = channel_attention_figure(
                attn[0].float().cpu().numpy(),
                title=f"{display_path(path.name)} - XCA channel attention, block {b} (of 0..{len(model.blocks) - 1}), "
                      f"{d}x{d} per head",
            )
            figures.append(save_png(fig, out / f"{stem}_xca{b}.png", dpi=dpi, palette=palette))
        yield AttentionResult(str(path), x, maps, top, figures)
