"""COCO box and mask AP with pycocotools: detections of a model on a :class:`CocoDetection` set."""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

import numpy as np
import torch

from .coco import CocoDetection

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(output: dict[str, torch.Tensor], image_id: Any, label_to_cat: dict[int, int],
                    masks: bool = True, mask_threshold: float = 0.5) -> list[dict]:
    """torchvision detections of one image as COCO result entries (bbox x y w h, score, category, RLE); a pixel
    belongs to a mask when its probability is >= ``mask_threshold`` (mmdet's ``mask_thr_binary`` rule)."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = None
    if masks and "masks" in output:
        from pycocotools import mask as mask_utils

        binary = (output["masks"][:, 0] >= mask_threshold).to(torch.uint8).cpu().numpy()
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
    results = []
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        entry = {"image_id": image_id, "category_id": label_to_cat[labels[i]], "score": round(scores[i], 5),
                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]}
        if rles is not None:
            entry["segmentation"] = {"size": list(rles[i]["size"]), "counts": rles[i]["counts"].decode("ascii")}
        results.append(entry)
    return results


def coco_eval(gt: dict[str, Any], results: list[dict], iou_type: str = "bbox", max_dets: int = 100,
              verbose: bool = False) -> dict[str, float]:
    """COCO metrics (AP, AP50, AP75, APs/m/l, AR...) of ``results`` against the ground-truth dict ``gt``.

    With no detections at all every metric is 0 (pycocotools itself would fail). Metrics without
    ground truth (e.g. APl when no object is large) are NaN.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = {k: gt[k] for k in ("images", "annotations", "categories")}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (float(v) if v >= 0 else float("nan")) for name, v in zip(STAT_NAMES, ev.stats)}


@torch.no_grad()
def predict_dataset(model, dataset: CocoDetection, device: torch.device, indices=None, amp_dtype=None,
                    progress: bool = False) -> list[dict]:
    """COCO results of ``model`` (eval mode) on ``dataset`` images ``indices`` (all by default)."""
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    masks = net.roi_heads.has_mask()
    results: list[dict] = []
    indices = list(range(len(dataset))) if indices is None else list(indices)
    for n, i in enumerate(indices):
        image, _ = dataset.load(i)
        x = image.to(device).float().div_(255)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net([x])[0]
        results += to_coco_results(out, dataset.images[i]["id"], dataset.label_to_cat, masks=masks)
        if progress and (n + 1) % 20 == 0:
            print(f"  predicted {n + 1}/{len(indices)} images", file=sys.stderr, flush=True)
    net.train(was_training)
    return results


def evaluate_results(dataset: CocoDetection, results: list[dict], masks: bool) -> dict[str, dict[str, float]]:
    """{"bbox": metrics, "segm": metrics (Mask R-CNN only)} of ``results`` on ``dataset``'s ground truth."""
    metrics = {"bbox": coco_eval(dataset.coco, results, "bbox")}
    if masks:
        metrics["segm"] = coco_eval(dataset.coco, results, "segm")
    return metrics


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A small table: one row per IoU type, AP / AP50 / AP75 / APs / APm / APl / AR100 in percent."""
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    lines = ["type  " + " ".join(f"{c:>6}" for c in cols)]
    for kind, m in metrics.items():
        lines.append(f"{kind:<5} " + " ".join(f"{100 * m[c]:6.1f}" if m[c] == m[c] else f"{'-':>6}" for c in cols))
    return "\n".join(lines)
