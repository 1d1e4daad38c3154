"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel and class accuracy."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class ConfusionMatrix:
    """Accumulates a (num_classes, num_classes) matrix, rows = ground truth, columns = prediction.

    Pixels whose target equals ``ignore_index`` are skipped. Sum across processes with
    :meth:`all_reduce` before reading the metrics in distributed evaluation.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"expected num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and target class maps (same shape, integer)."""
        if pred.shape != target.shape:
            raise ValueError(f"expected prediction and target of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= n):
            raise ValueError(f"expected target classes in 0..{n - 1} or {self.ignore_index}, got values {target.unique()[:10].tolist()}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"expected predicted classes in 0..{n - 1}, got values {pred.unique()[:10].tolist()}")
        self.matrix += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            m = self.matrix.to(device)
            dist.all_reduce(m)
            self.matrix = m.cpu()

    def compute(self) -> dict:
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix: torch.Tensor | Sequence[Sequence[int]]) -> dict:
    """IoU per class = TP / (TP + FP + FN); NaN (and left out of the mean) for classes absent from
    both ground truth and prediction. Returns ``miou``, ``iou`` (list), ``pixel_acc`` (labelled
    pixels predicted right), ``mean_acc`` (mean per-class recall over classes present) and ``pixels``.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(m.shape)}")
    tp = m.diag()
    gt = m.sum(1)
    pr = m.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    total = m.sum()
    return {
        "miou": _nanmean(iou),
        "iou": iou.tolist(),
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_acc": _nanmean(acc),
        "pixels": int(total),
    }


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if valid.any() else math.nan


def format_metrics(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """A per-class IoU table followed by mIoU, pixel accuracy and mean accuracy (percent)."""
    names = list(class_names or [str(i) for i in range(len(metrics["iou"]))])
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{'class'.ljust(width)}  IoU (%)", f"{'-' * width}  -------"]
    for name, iou in zip(names, metrics["iou"]):
        lines.append(f"{name.ljust(width)}  {'n/a' if math.isnan(iou) else f'{100 * iou:6.2f}'}")
    lines.append(
        f"mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['pixel_acc']:.2f}  "
        f"mean acc {100 * metrics['mean_acc']:.2f}  ({metrics['pixels']:,} labelled pixels)"
    )
    return "\n".join(lines)
