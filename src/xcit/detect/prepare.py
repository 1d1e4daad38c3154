"""`xcit detect prepare`: the real datasets shipped in PyPI wheels as COCO-format detection datasets.

* ``trees``: deepforest's annotated NEON aerial images. Training: the two Yellowstone crops (1249x1035,
  279 crowns; 2299x2472, 574 crowns) tiled with overlap, and SOAP_061 (400x400, 37 crowns, alive and
  dead both as "tree"); held out: OSBS_029.png (400x400, 61 crowns), a different site.
* ``nuclei``: stardist's 512x512 fluorescence image with 125 labelled nuclei (instance masks as RLE).
  Training: three quadrants; held out: the bottom-right one (:mod:`xcit.data.split`).

Output: ``OUT/images/{train,val}/*.png``, ``OUT/annotations/{train,val}.json``, ``OUT/SOURCE.txt``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.outputs import staged_folder
from ..data.split import HELD_OUT_QUADRANT, TRAIN_QUADRANTS, quadrant_slices
from ..data.trees import read_voc

DATASETS = ("trees", "nuclei")
TREE_TRAIN = ("2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2", "SOAP_061")
TREE_HELD_OUT = "OSBS_029"
_LICENCE = {
    "trees": (
        "Source: the deepforest wheel (PyPI deepforest 2.1.0, MIT licence; Weinstein et al., DeepForest), files\n"
        "deepforest/data/{OSBS_029,SOAP_061,2019_YELL_2_541000_4977000_image_crop,2019_YELL_2_528000_4978000_image_crop2}\n"
        ".png + .xml: RGB orthophotos of the US National Ecological Observatory Network (NEON; NEON data are released\n"
        "under CC0 1.0) with hand-annotated crown boxes. SOAP_061's 'Alive' and 'Dead' labels are both 'tree' here.\n"
        "Boxes only: train Faster R-CNN, or Mask R-CNN with each box as its mask.\n"
    ),
    "nuclei": (
        "Source: stardist/data/images/img2d.tif + mask2d.tif from the stardist wheel (PyPI stardist 0.9.2,\n"
        "BSD-3-Clause licence); stardist describes the image as from the 2018 Kaggle Data Science Bowl\n"
        "(BBBC038, Caicedo et al., Nature Methods 2019). Instance masks are the labelled nuclei, as RLE.\n"
        "Image: 16-bit intensities stretched to 8 bits at the 1st / 99.8th percentile of the training quadrants.\n"
    ),
}


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``length`` with tiles of ``tile`` overlapping by at least ``overlap`` (last tile flush)."""
    if length <= tile:
        return [0]
    step = max(tile - overlap, 1)
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def crop_boxes(boxes: np.ndarray, x0: int, y0: int, w: int, h: int, min_visible: float) -> np.ndarray:
    """Boxes (x0 y0 x1 y1) clipped to the window and shifted into it; those with less than
    ``min_visible`` of their area inside are dropped."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    c = boxes - np.array([x0, y0, x0, y0], dtype=np.float64)
    clipped = np.stack([c[:, 0].clip(0, w), c[:, 1].clip(0, h), c[:, 2].clip(0, w), c[:, 3].clip(0, h)], 1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    return clipped[inside >= min_visible * np.maximum(area, 1e-9)]


class CocoWriter:
    """Collects images and annotations of one split and writes them as a COCO file."""

    def __init__(self, out: Path, split: str, categories: list[str]) -> None:
        self.out, self.split = out, split
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.categories = [{"id": i + 1, "name": n, "supercategory": n} for i, n in enumerate(categories)]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    def add(self, name: str, image: np.ndarray, boxes: np.ndarray, masks: list[np.ndarray] | None = None) -> None:
        from pycocotools import mask as mask_utils

        image_id = len(self.images) + 1
        Image.fromarray(np.ascontiguousarray(image)).save(self.out / "images" / self.split / f"{name}.png")
        self.images.append({"id": image_id, "file_name": f"{self.split}/{name}.png", "height": int(image.shape[0]),
                            "width": int(image.shape[1])})
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                   "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                   "area": round(float((x1 - x0) * (y1 - y0)), 2)}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
                ann["area"] = int(masks[i].sum())
            self.annotations.append(ann)

    def write(self, description: str) -> Path:
        path = self.out / "annotations" / f"{self.split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": {"description": description}, "images": self.images,
                                    "annotations": self.annotations, "categories": self.categories}))
        return path


def prepare_trees(out: Path, source=None, tile: int = 400, overlap: int = 100, min_visible: float = 0.5,
                  in_domain: bool = False) -> dict:
    """Trees as described in the module docstring; ``in_domain`` instead trains on OSBS_029's three other
    quadrants too and holds out its bottom-right quadrant (segmentation's split): a same-site diagnostic."""
    train, val = CocoWriter(out, "train", ["tree"]), CocoWriter(out, "val", ["tree"])
    if in_domain:
        image, boxes = read_voc(TREE_HELD_OUT, source)
        h, w = image.shape[:2]
        for q in (*TRAIN_QUADRANTS, HELD_OUT_QUADRANT):
            rows, cols = quadrant_slices(h, w, q)
            kept = crop_boxes(boxes, cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start, min_visible)
            (val if q == HELD_OUT_QUADRANT else train).add(f"{TREE_HELD_OUT}_{q}", image[rows, cols], kept)
    for stem in TREE_TRAIN:
        image, boxes = read_voc(stem, source)
        h, w = image.shape[:2]
        for y0 in tile_starts(h, tile, overlap):
            for x0 in tile_starts(w, tile, overlap):
                th, tw = min(tile, h), min(tile, w)
                train.add(f"{stem}_y{y0}_x{x0}", image[y0:y0 + th, x0:x0 + tw], crop_boxes(boxes, x0, y0, tw, th, min_visible))
    if not in_domain:
        image, boxes = read_voc(TREE_HELD_OUT, source)
        val.add(TREE_HELD_OUT, image, boxes)
    held_out = (f"{TREE_HELD_OUT}.png's {HELD_OUT_QUADRANT} quadrant (its other three quadrants are trained on: "
                "--in-domain)" if in_domain else f"{TREE_HELD_OUT}.png (whole)")
    notes = (f"Training: {', '.join(TREE_TRAIN)} cut into {tile}x{tile} tiles overlapping by >= {overlap} px; a box is\n"
             f"kept in a tile when >= {min_visible:.0%} of it is inside (then clipped). Held out: {held_out}.\n")
    return {"train": train, "val": val, "notes": notes}


def prepare_nuclei(out: Path, source=None, min_pixels: int = 16) -> dict:
    from ..data.nuclei import load_nuclei, to_uint8

    raw, labels = load_nuclei(source)
    image, (lo, hi) = to_uint8(raw)
    h, w = image.shape
    writers = {"train": CocoWriter(out, "train", ["nucleus"]), "val": CocoWriter(out, "val", ["nucleus"])}
    for split, quadrants in (("train", TRAIN_QUADRANTS), ("val", (HELD_OUT_QUADRANT,))):
        for q in quadrants:
            rows, cols = quadrant_slices(h, w, q)
            lab = labels[rows, cols]
            masks, boxes = [], []
            for k in np.unique(lab[lab > 0]):
                m = lab == k
                if m.sum() < min_pixels:
                    continue
                ys, xs = np.nonzero(m)
                masks.append(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            writers[split].add(f"nuclei_{q}", image[rows, cols], np.asarray(boxes, np.float64).reshape(-1, 4), masks)
    notes = (f"Intensity window: {lo:g} .. {hi:g} (of 16-bit values). Training: the {', '.join(TRAIN_QUADRANTS)} quadrants;\n"
             f"held out: {HELD_OUT_QUADRANT} (xcit.data.split). Nuclei cut by a quadrant border keep their inside part;\n"
             f"parts under {min_pixels} pixels are dropped.\n")
    return {**writers, "notes": notes}


#: what :func:`prepare` writes in its output folder (an earlier dataset there is refused unless overwrite)
OUTPUTS = ("images/train", "images/val", "annotations/train.json", "annotations/val.json", "SOURCE.txt")


def prepare(name: str, out: str | os.PathLike, source: str | os.PathLike | None = None, *, overwrite: bool = False,
            **options) -> dict[str, Path]:
    """Write dataset ``name`` to ``out``; returns the paths of the train and val COCO files.

    The dataset is written into a temporary folder beside ``out`` and moved into it once complete
    (:func:`xcit.data.outputs.staged_folder`): a source that cannot be read, or a full disk, leaves ``out``
    as it was. An earlier dataset in ``out`` (any of :data:`OUTPUTS`) is refused unless ``overwrite``.
    """
    if name not in DATASETS:
        raise ValueError(f"expected a dataset in {DATASETS}, got {name!r}")
    out = Path(out)
    with staged_folder(out, OUTPUTS, overwrite=overwrite) as stage:
        parts = (prepare_trees if name == "trees" else prepare_nuclei)(stage, source, **options)
        for split in ("train", "val"):
            parts[split].write(f"xcit detect prepare {name} ({split})")
        counts = "".join(f"{split}: {len(parts[split].images)} images, {len(parts[split].annotations)} objects\n"
                         for split in ("train", "val"))
        (stage / "SOURCE.txt").write_text(_LICENCE[name] + parts["notes"] + counts)
    return {split: out / "annotations" / f"{split}.json" for split in ("train", "val")}
