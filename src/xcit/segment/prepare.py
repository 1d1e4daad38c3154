"""`xcit segment prepare`: write the real single-image datasets as ADE20k-style folders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.outputs import staged_folder
from ..data.split import HELD_OUT_QUADRANT, TRAIN_QUADRANTS, quadrant_slices
from .data import DatasetInfo

DATASETS = ("nuclei", "trees")

_NOTES = {
    "nuclei": (
        "Source: stardist/data/images/img2d.tif + mask2d.tif from the stardist wheel (BSD-3-Clause licence;\n"
        "stardist describes the image as from the 2018 Kaggle Data Science Bowl, Caicedo et al., Nature Methods 2019).\n"
        "Task: nucleus (1) vs background (0), from the instance labels (label > 0).\n"
        "Image: 16-bit intensities stretched to 8 bits at the 1st / 99.8th percentile of the training quadrants.\n"
    ),
    "trees": (
        "Source: deepforest/data/OSBS_029.png + OSBS_029.xml from the deepforest wheel (MIT licence;\n"
        "NEON airborne RGB imagery, Weinstein et al.). Task: tree crown (1) vs background (0), masks are the\n"
        "61 annotated crown boxes filled (box-level annotation: the ground truth is rectangular).\n"
    ),
}


#: what :func:`prepare` writes in its output folder (an earlier dataset there is refused unless overwrite)
OUTPUTS = ("images/training", "images/validation", "annotations/training", "annotations/validation", "dataset.yaml",
           "SOURCE.txt")


def prepare(name: str, out: str | os.PathLike, source: str | os.PathLike | None = None, *,
            overwrite: bool = False) -> Path:
    """Write dataset ``name`` (nuclei or trees) to ``out``: images/{training,validation},
    annotations/{training,validation}, dataset.yaml and SOURCE.txt. Training = three quadrants,
    validation = the held-out one (:mod:`xcit.data.split`).

    The files go to a temporary folder moved into ``out`` once complete (:func:`xcit.data.outputs.staged_folder`):
    a source that cannot be read, or a full disk, leaves ``out`` as it was. An earlier dataset in ``out`` (any of
    :data:`OUTPUTS`) is refused unless ``overwrite``, before the source is read.
    """
    if name not in DATASETS:
        raise ValueError(f"expected a dataset in {DATASETS}, got {name!r}")
    out = Path(out)
    with staged_folder(out, OUTPUTS, overwrite=overwrite) as stage:  # refused here, before the source is read
        _write(name, stage, source)
    return out


def _write(name: str, out: Path, source: str | os.PathLike | None) -> None:
    if name == "nuclei":
        from ..data.nuclei import CLASSES, load_nuclei, to_uint8

        raw, labels = load_nuclei(source)
        image, (lo, hi) = to_uint8(raw)
        mask = (labels > 0).astype(np.uint8)
        extra = f"Intensity window: {lo:g} .. {hi:g} (of 16-bit values).\n"
        palette = [[0, 0, 0], [255, 70, 70]]
    else:
        from ..data.trees import CLASSES, boxes_to_mask, load_trees

        image, boxes = load_trees(source)
        mask = boxes_to_mask(boxes, *image.shape[:2])
        extra = f"{len(boxes)} boxes.\n"
        palette = [[0, 0, 0], [40, 220, 60]]
    h, w = mask.shape
    for split, quadrants in (("training", TRAIN_QUADRANTS), ("validation", (HELD_OUT_QUADRANT,))):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for q in quadrants:
            rows, cols = quadrant_slices(h, w, q)
            Image.fromarray(np.ascontiguousarray(image[rows, cols])).save(out / "images" / split / f"{name}_{q}.png")
            Image.fromarray(np.ascontiguousarray(mask[rows, cols])).save(out / "annotations" / split / f"{name}_{q}.png")
    DatasetInfo(classes=list(CLASSES), palette=palette, ignore_index=255, reduce_zero_label=False, name=name).save(out)
    (out / "SOURCE.txt").write_text(
        _NOTES[name] + extra + f"Split: training = {', '.join(TRAIN_QUADRANTS)} quadrants; validation = {HELD_OUT_QUADRANT} "
        "(xcit.data.split).\n"
    )
