"""Detection on image files: PNG overlays (boxes, masks, scores) and one COCO-format JSON file."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.images import display_path, read_image
from ..data.outputs import atomic_write, claim_files, unique_stems
from .evaluation import to_coco_results

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def draw_overlay(image: torch.Tensor, output: dict[str, torch.Tensor], classes: list[str], score_thresh: float = 0.5,
                 alpha: float = 0.45, mask_threshold: float = 0.5, labels: bool = True,
                 line_width: int | None = None) -> Image.Image:
    """The uint8 (3, H, W) ``image`` with the detections scoring >= ``score_thresh``: tinted masks (probability
    >= ``mask_threshold``, as :func:`~xcit.detect.evaluation.to_coco_results`), boxes, scores. ``line_width``:
    the boxes' outline in pixels (default: the image's longer side / 400)."""
    canvas = image.permute(1, 2, 0).numpy().astype(np.float32)
    keep = output["scores"] >= score_thresh
    boxes, scores, cls = output["boxes"][keep], output["scores"][keep], output["labels"][keep]
    # one class: a colour per instance; several: a colour per class
    colours = [COLOURS[(i if len(classes) <= 1 else c - 1) % len(COLOURS)] for i, c in enumerate(cls.tolist())]
    if "masks" in output:
        for m, colour in zip(output["masks"][keep][:, 0] >= mask_threshold, colours):
            colour = np.array(colour, np.float32)
            sel = m.numpy()
            canvas[sel] = (1 - alpha) * canvas[sel] + alpha * colour
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    width = line_width or max(1, round(max(img.size) / 400))
    for (x0, y0, x1, y1), s, c, colour in zip(boxes.tolist(), scores.tolist(), cls.tolist(), colours):
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        if labels:
            name = classes[c - 1] if 0 < c <= len(classes) else str(c)
            draw.text((x0 + 2, y0 + 1), f"{name} {s:.2f}", fill=colour)
    return img


def prediction_files(stems: list[str], overlays: bool = True) -> list[str]:
    """The names :func:`predict_files` writes for images of output names ``stems``."""
    return [*(f"{stem}_overlay.png" for stem in stems if overlays), "predictions.json"]


def predict_files(model, files: list[Path], out: str | os.PathLike, classes: list[str], category_ids: list[int],
                  device: torch.device, score_thresh: float = 0.5, overlays: bool = True,
                  on_error: Callable[[str, str], None] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Run ``model`` on every file (each in one pass at the model's test size), write NAME_overlay.png
    and ``predictions.json`` (COCO: images, categories and the detections as annotations with scores).

    NAME is the file's stem, or more of its name where two inputs share a stem
    (:func:`xcit.data.outputs.unique_stems`: ``a.png`` and ``a.jpg`` give ``a.png_overlay.png`` and
    ``a.jpg_overlay.png``). Every file to be written is checked first: one that exists is refused unless
    ``overwrite``. An unreadable file raises ``ValueError``, or, with ``on_error``, is passed to
    ``on_error(path, message)``, listed under ``"unreadable"`` in the JSON (``[{"path", "error"}]``) and skipped.
    """
    if not (isinstance(score_thresh, (int, float)) and 0.0 <= score_thresh <= 1.0):
        raise ValueError(f"expected a score threshold in [0, 1] (scores are probabilities), got {score_thresh!r}")
    files = [Path(f) for f in files]
    stems = unique_stems(files)
    out = Path(out)
    claim_files(out, prediction_files(stems, overlays), overwrite=overwrite)
    label_to_cat = {i + 1: cid for i, cid in enumerate(category_ids)}
    images, detections, timings, unreadable = [], [], [], []
    masks = model.roi_heads.has_mask()
    for image_id, (path, stem) in enumerate(zip(files, stems), start=1):
        try:
            image = read_image(path)
        except ValueError as err:
            if on_error is None:
                raise
            unreadable.append({"path": display_path(path), "error": str(err)})
            on_error(str(path), str(err))
            continue
        t = time.time()
        with torch.inference_mode():
            output = {k: v.cpu() for k, v in model([image.to(device).float().div_(255)])[0].items()}
        timings.append(time.time() - t)
        images.append({"id": image_id, "file_name": display_path(path), "height": int(image.shape[1]),
                       "width": int(image.shape[2])})
        kept = {k: v[output["scores"] >= score_thresh] for k, v in output.items()}
        for det in to_coco_results(kept, image_id, label_to_cat, masks=masks):
            det.update(id=len(detections) + 1, area=round(det["bbox"][2] * det["bbox"][3], 2), iscrowd=0)
            detections.append(det)
        if overlays:
            with atomic_write(out / f"{stem}_overlay.png") as tmp:
                draw_overlay(image, output, classes, score_thresh).save(tmp, format="PNG")
        print(f"{display_path(path)}: {int(kept['scores'].numel())} objects with score >= {score_thresh} "
              f"({timings[-1]:.2f} s)")
    coco = {"images": images, "annotations": detections,
            "categories": [{"id": cid, "name": n} for cid, n in zip(category_ids, classes)]}
    if unreadable:
        coco["unreadable"] = unreadable
    with atomic_write(out / "predictions.json") as tmp:
        tmp.write_text(json.dumps(coco))
    return {"images": len(images), "detections": len(detections), "seconds": timings, "unreadable": len(unreadable)}
