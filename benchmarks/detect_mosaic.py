"""Tiled detection of a mosaic vs. its images one by one: box AP50 of both and the crowns reported twice at seams.

The held-out trees site of ``xcit detect prepare trees`` is one image (deepforest's OSBS_029, 400 x 400, 61 crowns),
so the mosaic is a ``--grid`` x ``--grid`` arrangement of copies of it under the eight flips / quarter turns of the
square (each a held-out image with its crowns moved with it; the arrangement is in the result file), annotations
shifted into the mosaic. Predicted

* **one by one**: each copy through ``model([image])``, the path of ``xcit detect predict`` (the checkpoint's test
  size), boxes shifted into the mosaic;
* **tiled**: the whole mosaic through :func:`xcit.detect.tiled.detect_large` (one global backbone pass, tiles for
  the neck and heads, the core rule + cross-tile suppression by IoU or intersection over the smaller box), for each
  ``--tiles`` setting; from the same tile detections the merge is also scored without the IoS rule, with the core
  rule alone, with a plain class-wise NMS over all tiles (``nms only``) and with no merge (``none``).

For reference, the whole mosaic also goes through ``model([mosaic])`` in one pass at native resolution, with the
budgets scaled by its area as a tile's are (it separates the effect of the mosaic's context from that of tiling).
All are scored on the mosaic's ground truth as one image (pycocotools, up to 10000 detections, so no cap binds),
AP50 in percent. Seam duplicates: ground-truth crowns whose box crosses a core boundary of the tiling and that two
detections (score >= ``--dup-score``) from different tiles both match at IoU >= 0.5; also pairs of kept
detections from different tiles overlapping at IoU > 0.5.

    OMP_NUM_THREADS=1 python benchmarks/detect_mosaic.py --checkpoint runs/detect/trees/last.pt \\
        runs/detect/trees/best.pt --data data/detect/trees --out benchmarks/detect_mosaic.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from xcit.data.images import read_image
from xcit.data.outputs import atomic_write
from xcit.detect.evaluation import coco_eval, to_coco_results
from xcit.detect.model import load_detector, set_test_size
from xcit.detect.tiled import LargeDetections, detect_large, in_core, merge_detections, tile_budgets, using_budgets

# the eight symmetries of the square as steps applied in order: t transpose, h left-right flip, v up-down flip
SYMMETRIES = ["", "h", "v", "hv", "t", "th", "tv", "thv"]
MAX_DETS = 10000


def transform(image: np.ndarray, boxes: np.ndarray, steps: str) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) and its boxes (N, 4, x0 y0 x1 y1 in pixel edges) under the ``steps``."""
    boxes = boxes.copy()
    for step in steps:
        h, w = image.shape[:2]
        if step == "t":
            image, boxes = image.transpose(1, 0, 2), boxes[:, [1, 0, 3, 2]]
        elif step == "h":
            image, boxes = image[:, ::-1], np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        elif step == "v":
            image, boxes = image[::-1], np.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)
    return np.ascontiguousarray(image), boxes


def build_mosaic(data: Path, grid: int) -> tuple[np.ndarray, dict, list[dict]]:
    """(mosaic uint8 image, its COCO ground truth as one image, the cells: source, symmetry, offset)."""
    val = json.loads((data / "annotations" / "val.json").read_text())
    if len(val["images"]) != 1:
        raise SystemExit(f"expected the one held-out image of `xcit detect prepare trees`, got {len(val['images'])}")
    info = val["images"][0]
    image = read_image(data / "images" / info["file_name"]).permute(1, 2, 0).numpy()
    anns = [a for a in val["annotations"] if a["image_id"] == info["id"]]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float64)
    side = image.shape[0]
    if image.shape[1] != side:
        raise SystemExit("expected a square held-out image (its quarter turns fill the same cells)")
    mosaic = np.zeros((grid * side, grid * side, 3), np.uint8)
    gt = {"images": [{"id": 1, "file_name": "mosaic", "height": grid * side, "width": grid * side}],
          "annotations": [], "categories": val["categories"]}
    cells = []
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        steps = SYMMETRIES[k % len(SYMMETRIES)]
        img, b = transform(image, boxes, steps)
        mosaic[r * side:(r + 1) * side, c * side:(c + 1) * side] = img
        b = b + [c * side, r * side, c * side, r * side]
        for a, (x0, y0, x1, y1) in zip(anns, b):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 1, "category_id": a["category_id"],
                                      "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        cells.append({"source": info["file_name"], "symmetry": steps or "identity", "row": r * side, "col": c * side,
                      "image": img})
    return mosaic, gt, cells


def one_by_one(model, cells: list[dict], label_to_cat: dict[int, int]) -> tuple[list[dict], float]:
    """COCO results of each cell predicted alone (``xcit detect predict``'s path), in mosaic pixels; seconds."""
    results, start = [], time.perf_counter()
    for cell in cells:
        x = torch.from_numpy(cell["image"]).permute(2, 0, 1).float().div(255)
        with torch.inference_mode():
            out = model([x])[0]
        out["boxes"] = out["boxes"] + torch.tensor([cell["col"], cell["row"], cell["col"], cell["row"]])
        results += to_coco_results(out, 1, label_to_cat, masks=False)
    return results, time.perf_counter() - start


def whole_mosaic(model, mosaic: np.ndarray, label_to_cat: dict[int, int]) -> tuple[list[dict], float]:
    """COCO results of ``model([mosaic])`` at native resolution in one pass, with the proposal and detection budgets
    scaled by its area as a tile's would be: what tiling changes, apart from the global context."""
    size, budgets = model.transform.test_size, tile_budgets(model, mosaic.shape[0] * mosaic.shape[1])
    set_test_size(model, 0)  # after the budgets: they scale from the test size
    start = time.perf_counter()
    try:
        with using_budgets(model, budgets), torch.inference_mode():
            out = model([torch.from_numpy(mosaic).permute(2, 0, 1).float().div(255)])[0]
    finally:
        set_test_size(model, size)
    return to_coco_results(out, 1, label_to_cat, masks=False), time.perf_counter() - start


def seam_crowns(gt: dict, found: LargeDetections) -> np.ndarray:
    """Indices of the ground-truth boxes crossing a core boundary of ``found``'s tiling."""
    cuts_y = sorted({t.core[1] for t in found.tiles if np.isfinite(t.core[1])})
    cuts_x = sorted({t.core[3] for t in found.tiles if np.isfinite(t.core[3])})
    seam = []
    for i, a in enumerate(gt["annotations"]):
        x, y, w, h = a["bbox"]
        if any(x < c < x + w for c in cuts_x) or any(y < c < y + h for c in cuts_y):
            seam.append(i)
    return np.array(seam, np.int64)


def duplicates(gt: dict, found: LargeDetections, min_score: float) -> dict[str, int]:
    """Seam crowns matched (IoU >= 0.5) by detections of two different tiles, and cross-tile pairs at IoU > 0.5."""
    sel = found.above(min_score)
    gt_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in gt["annotations"])])
    seam = seam_crowns(gt, found)
    twice = 0
    if len(sel) and seam.size:
        iou = box_iou(gt_boxes[seam], sel.boxes.double())
        for row in iou:
            tiles = set(sel.tile_ids[row >= 0.5].tolist())
            twice += len(tiles) >= 2
    pairs = 0
    if len(sel) > 1:
        iou = box_iou(sel.boxes, sel.boxes)
        other = sel.tile_ids[:, None] != sel.tile_ids[None]
        pairs = int(((iou > 0.5) & other).triu(1).sum())
    return {"seam_crowns": int(seam.size), "seam_crowns_reported_twice": int(twice), "cross_tile_pairs_iou50": pairs}


def variants(raw: LargeDetections, nms: float) -> dict[str, LargeDetections]:
    """The merge (core + NMS), each rule alone, and neither, on the same tile detections."""
    def by_score(idx: torch.Tensor) -> torch.Tensor:
        return idx[torch.argsort(raw.scores[idx], descending=True, stable=True)]

    merged = merge_detections(raw.boxes, raw.scores, raw.labels, raw.tile_ids, raw.tiles, nms)
    iou_only = merge_detections(raw.boxes, raw.scores, raw.labels, raw.tile_ids, raw.tiles, nms, ios_thresh=2.0)
    return {"core + cross-tile IoU/IoS (detect_large)": raw.select(merged),
            "core + cross-tile IoU only": raw.select(iou_only), "core only": raw.select(by_score(_core_only(raw))),
            "nms only": raw.select(batched_nms(raw.boxes, raw.scores, raw.labels, nms)),
            "none": raw.select(by_score(torch.arange(len(raw))))}


def _core_only(raw: LargeDetections) -> torch.Tensor:
    """Indices of the detections whose box centre lies in the core of their own tile."""
    cores = torch.tensor([t.core for t in raw.tiles], dtype=torch.float64)[raw.tile_ids]
    return in_core(raw.boxes, cores).nonzero()[:, 0]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except OSError:
        return platform.processor()


def evaluate(path: str, mosaic: np.ndarray, gt: dict, cells: list[dict], tiles: list[str], dup_score: float) -> dict:
    """One checkpoint's results: one by one, the whole mosaic in one pass, and each tiling with each merge."""
    model, meta = load_detector(path)
    label_to_cat = {i + 1: c for i, c in enumerate(meta.get("category_ids") or [1])}

    def ap(res: list[dict]) -> float:
        return round(100 * coco_eval(gt, res, "bbox", max_dets=MAX_DETS)["AP50"], 2)

    base, base_s = one_by_one(model, cells, label_to_cat)
    whole, whole_s = whole_mosaic(model, mosaic, label_to_cat)
    result = {"checkpoint": path, "test_size": model.transform.test_size,
              "one_by_one": {"box_ap50": ap(base), "detections": len(base), "seconds": round(base_s, 2)},
              "whole_mosaic_one_pass": {"box_ap50": ap(whole), "detections": len(whole), "seconds": round(whole_s, 2)},
              "tiled": []}
    print(f"{path}: one by one ({len(cells)} images) AP50 {result['one_by_one']['box_ap50']}; whole mosaic in one "
          f"pass (budgets scaled by area) AP50 {result['whole_mosaic_one_pass']['box_ap50']}")
    for setting in tiles:
        tile, overlap = (int(v) for v in setting.split(":"))
        raw = detect_large(model, mosaic, tile=tile, overlap=overlap, merge=False)
        row = {"tile": tile, "overlap": overlap, "tiles": len(raw.tiles),
               "seconds": {k: round(v, 2) for k, v in raw.seconds.items()}, "merges": {}}
        for name, found in variants(raw, model.roi_heads.nms_thresh).items():
            res = to_coco_results(found.output(), 1, label_to_cat, masks=False)
            row["merges"][name] = {"box_ap50": ap(res), "detections": len(found), **duplicates(gt, found, dup_score)}
            print(f"  tile {tile} overlap {overlap} ({len(raw.tiles)} tiles), {name}: {row['merges'][name]}")
        main_ap = row["merges"]["core + cross-tile IoU/IoS (detect_large)"]["box_ap50"]
        row["ap50_gap_to_one_by_one"] = round(main_ap - result["one_by_one"]["box_ap50"], 2)
        result["tiled"].append(row)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", default=["runs/detect/trees/last.pt"])
    parser.add_argument("--data", default="data/detect/trees", help="the dataset `xcit detect prepare trees` wrote")
    parser.add_argument("--grid", type=int, default=3, help="copies per side of the mosaic (default 3: 1200 x 1200)")
    parser.add_argument("--tiles", nargs="+", default=["1024:256", "384:128"], metavar="TILE:OVERLAP")
    parser.add_argument("--dup-score", type=float, default=0.3, help="score of detections counted as duplicates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--training", default=None, help="how the checkpoints were trained (recorded as given)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mosaic, gt, cells = build_mosaic(Path(args.data), args.grid)
    result = {"command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv), "cpu": cpu_model(),
              "threads": args.threads, "torch": torch.__version__, "dup_score": args.dup_score,
              "training": args.training,
              "mosaic": {"height": mosaic.shape[0], "width": mosaic.shape[1], "crowns": len(gt["annotations"]),
                         "cells": [{k: v for k, v in c.items() if k != "image"} for c in cells]},
              "runs": [evaluate(path, mosaic, gt, cells, args.tiles, args.dup_score) for path in args.checkpoint]}
    if args.out:
        with atomic_write(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
