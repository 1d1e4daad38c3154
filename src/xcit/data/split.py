"""The held-out split of the single-image real datasets (nuclei, trees): one quadrant.

Segmentation and detection use the same split, defined here only: the bottom-right quadrant
(rows and columns from H // 2 and W // 2) is held out for evaluation; the other three quadrants
are for training.
"""
from __future__ import annotations

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
HELD_OUT_QUADRANT = "bottom-right"
TRAIN_QUADRANTS = tuple(q for q in QUADRANTS if q != HELD_OUT_QUADRANT)


def quadrant_box(height: int, width: int, name: str) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of quadrant ``name`` of an image of ``height`` x ``width`` (split at H // 2, W // 2)."""
    if name not in QUADRANTS:
        raise ValueError(f"expected a quadrant in {QUADRANTS}, got {name!r}")
    if height < 2 or width < 2:
        raise ValueError(f"expected an image of at least 2x2 pixels, got {height}x{width}")
    hy, hx = height // 2, width // 2
    top, left = name.startswith("top"), name.endswith("left")
    return (0 if top else hy, 0 if left else hx, hy if top else height, hx if left else width)


def quadrant_slices(height: int, width: int, name: str) -> tuple[slice, slice]:
    """Row and column slices of quadrant ``name`` (index an array as ``a[rows, cols]``)."""
    y0, x0, y1, x1 = quadrant_box(height, width, name)
    return slice(y0, y1), slice(x0, x1)
