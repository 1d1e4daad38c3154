"""Class-attention maps of several XCiTs side by side (e.g. DINO teacher, random init, supervised)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..models import XCiT
from ..viz.attention import forward_with_attention
from ..viz.plot import to_display


@torch.no_grad()
def mean_class_attention(model: XCiT, images: torch.Tensor) -> np.ndarray:
    """(B, H, W) cls-to-patch attention of the last class-attention layer, mean over heads, at pixel resolution."""
    model.eval()
    maps = forward_with_attention(model, images)
    return maps.upsampled(tuple(images.shape[-2:])).mean(1).cpu().numpy()


def attention_comparison(models: Mapping[str, XCiT], images: torch.Tensor, mean: Sequence[float],
                         std: Sequence[float], *, captions: Sequence[str] | None = None, cmap: str = "inferno",
                         alpha: float = 0.6, panel_inches: float = 1.9) -> Figure:
    """One row per image: the input, then each model's head-averaged class attention over it.

    Each overlay is min-max scaled on its own (the maps are upsampled from the patch grid).
    """
    if images.ndim != 4 or not models:
        raise ValueError(f"expected a (B, C, H, W) batch and at least one model, got {tuple(images.shape)} and {len(models)}")
    maps = {name: mean_class_attention(m, images) for name, m in models.items()}
    rows, cols = len(images), 1 + len(models)
    fig = Figure(figsize=(cols * panel_inches, rows * panel_inches + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    for r in range(rows):
        picture = to_display(images[r], mean, std)
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(picture)
        ax.set_title(captions[r] if captions else "input", fontsize=8)
        ax.set_axis_off()
        for c, (name, m) in enumerate(maps.items()):
            ax = fig.add_subplot(rows, cols, r * cols + c + 2)
            a = m[r]
            span = float(a.max() - a.min())
            ax.imshow(picture)
            ax.imshow((a - a.min()) / span if span > 0 else np.zeros_like(a), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    return fig
