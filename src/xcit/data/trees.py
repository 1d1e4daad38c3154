"""Tree crowns in an aerial image: deepforest's OSBS_029 (400x400 RGB, NEON, 61 annotated crowns).

Ships in the ``deepforest`` wheel (MIT; install with ``pip install --no-deps deepforest``) as
``deepforest/data/OSBS_029.png`` with boxes in ``OSBS_029.xml`` (Pascal VOC). The held-out split
is :mod:`xcit.data.split`'s bottom-right quadrant.
"""
from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET

import numpy as np

from .images import open_image
from .packaged import package_file

PIP = "pip install --no-deps deepforest==2.1.0"
CLASSES = ["background", "tree"]


def read_voc(stem: str, source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image (H, W, 3), boxes float (N, 4) as x0, y0, x1, y1 in pixels) of deepforest's
    ``data/<stem>.png`` and its Pascal VOC ``data/<stem>.xml``; ``source``: the wheel or its folder."""
    where = f"{os.fspath(source)}/" if source is not None else ""  # messages name the file inside the wheel
    data = package_file("deepforest", f"data/{stem}.png", source, PIP)
    with open_image(io.BytesIO(data), name=f"{where}deepforest/data/{stem}.png") as img:
        image = np.array(img.convert("RGB"))
    try:
        root = ET.fromstring(package_file("deepforest", f"data/{stem}.xml", source, PIP))
        boxes = [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for o in root.iter("object")]
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"cannot read the boxes of {where}deepforest/data/{stem}.xml: expected Pascal VOC XML with "
                         f"object/bndbox/xmin..ymax numbers ({err})") from None
    return image, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def load_trees(source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image (400, 400, 3), boxes float (N, 4) as x0, y0, x1, y1 in pixels, end-exclusive)."""
    image, boxes = read_voc("OSBS_029", source)
    if not len(boxes):
        raise ValueError("deepforest OSBS_029.xml holds no boxes")
    return image, boxes


def boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W): 1 inside any box, 0 elsewhere (boxes clipped to the image)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        xa, ya = max(int(round(x0)), 0), max(int(round(y0)), 0)
        xb, yb = min(int(round(x1)), width), min(int(round(y1)), height)
        mask[ya:yb, xa:xb] = 1
    return mask
