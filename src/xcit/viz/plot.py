"""Figures of attention maps (matplotlib, no display needed: figures render straight to PNG)."""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.outputs import atomic_write


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of one (C, H, W) image: (H, W, 3) floats in [0, 1] (grey is repeated)."""
    if x.ndim != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {tuple(x.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    img = (x.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def _percent(p: float) -> str:
    return f"{100 * p:.1f}%" if p >= 0.01 else f"{100 * p:.2g}%"


def _grid(panels: int, max_cols: int) -> tuple[int, int]:
    rows = math.ceil(panels / max_cols)
    return rows, math.ceil(panels / rows)


def class_attention_figure(
    image: np.ndarray,
    maps: np.ndarray,
    *,
    title: str = "",
    cmap: str = "inferno",
    alpha: float = 0.6,
    show_mean: bool = True,
    max_cols: int = 6,
    panel_inches: float = 2.4,
) -> Figure:
    """The input, then each head's cls-to-patch map (H, W) overlaid on it (and the head mean).

    ``maps`` is (heads, H, W) at the image's resolution (see ``AttentionMaps.upsampled``). Each
    overlay is min-max scaled on its own; its title gives the peak patch's share of the attention.
    """
    if image.ndim != 3 or maps.ndim != 3 or maps.shape[1:] != image.shape[:2]:
        raise ValueError(f"expected an (H, W, 3) image and (heads, H, W) maps, got {image.shape} and {maps.shape}")
    panels = [("input", None)] + [(f"head {i + 1}", m) for i, m in enumerate(maps)]
    if show_mean and len(maps) > 1:
        panels.append(("mean of heads", maps.mean(axis=0)))
    rows, cols = _grid(len(panels), max_cols)
    h, w = image.shape[:2]
    fig = Figure(figsize=(cols * panel_inches, rows * panel_inches * h / w + (0.45 if title else 0.1)), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (name, m) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(image)
        if m is not None:
            span = float(m.max() - m.min())
            scaled = (m - m.min()) / span if span > 0 else np.zeros_like(m)
            ax.imshow(scaled, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            name = f"{name}\npeak patch {_percent(float(m.max()))}"
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def channel_attention_figure(
    attn: np.ndarray, *, title: str = "", cmap: str = "viridis", max_cols: int = 4, panel_inches: float = 2.6
) -> Figure:
    """One (d, d) XCA channel-attention heatmap per head; rows are query channels, columns keys."""
    if attn.ndim != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"expected (heads, d, d) channel attention, got shape {attn.shape}")
    rows, cols = _grid(attn.shape[0], max_cols)
    fig = Figure(figsize=(cols * panel_inches + 0.6, rows * panel_inches + (0.45 if title else 0.1)), layout="constrained")
    FigureCanvasAgg(fig)
    vmax = float(attn.max())
    image = None
    axes = []
    for k, a in enumerate(attn):
        ax = fig.add_subplot(rows, cols, k + 1)
        image = ax.imshow(a, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"head {k + 1}", fontsize=9)
        ax.set_xlabel("key channel", fontsize=7)
        ax.set_ylabel("query channel", fontsize=7)
        ax.tick_params(labelsize=6)
        axes.append(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 100, palette: bool = False) -> Path:
    """Write ``fig`` as PNG; ``palette`` reduces it to 256 colours (about 3x smaller, for docs)."""
    path = Path(path)
    with atomic_write(path) as tmp:  # a full disk or an interruption never leaves half a PNG
        if palette:
            from PIL import Image

            buf = io.BytesIO()
            fig.savefig(buf, dpi=dpi, format="png")
            buf.seek(0)
            with Image.open(buf) as img:
                img.convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
        else:
            fig.savefig(tmp, dpi=dpi, format="png")
    return path
