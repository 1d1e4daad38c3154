"""The two engine pieces segmentation needs beyond the shared engine (:mod:`xcit.train`).

Process groups, synchronised BatchNorm, atomic checkpoints and the JSON Lines writer come from
:mod:`xcit.train`; here are the poly schedule with linear warm-up (driven by steps *or* a
wall-clock budget; ``xcit.train.optim`` has cosine and constant only) and the loss / mIoU plot.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..train.metrics import read_metrics


@dataclass
class PolySchedule:
    """Poly decay ``(base - min) * (1 - progress) ** power + min`` after a linear warm-up.

    ``progress`` is the larger of step / total_steps and elapsed / time_limit_s, so a run capped by
    wall-clock time still anneals its learning rate to the end. Warm-up (mmseg's 'linear') starts
    at ``warmup_ratio`` of the scheduled rate and reaches it after ``warmup_steps``.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    time_limit_s: float | None = None

    def progress(self, step: int, elapsed_s: float = 0.0) -> float:
        p = step / max(self.total_steps, 1)
        if self.time_limit_s:
            p = max(p, elapsed_s / self.time_limit_s)
        return min(max(p, 0.0), 1.0)

    def lr(self, step: int, elapsed_s: float = 0.0) -> float:
        lr = (self.base_lr - self.min_lr) * (1.0 - self.progress(step, elapsed_s)) ** self.power + self.min_lr
        if step < self.warmup_steps:
            lr *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return lr


def plot_history(jsonl: str | os.PathLike, out: str | os.PathLike, metric: str = "miou") -> Path | None:
    """Training loss and learning rate, and eval ``metric``, against step, as one PNG."""
    records = read_metrics(Path(jsonl))
    # a resumed run appends: keep the last record of each step so the curves do not double back
    train = sorted({r["step"]: r for r in records if r.get("kind") == "train"}.values(), key=lambda r: r["step"])
    evals = sorted({r["step"]: r for r in records if r.get("kind") == "eval" and _finite(r.get(metric))}.values(),
                   key=lambda r: r["step"])
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("training loss")
        lr_ax = axes[0].twinx()
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange", alpha=0.6)
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    if evals:
        axes[1].plot([r["step"] for r in evals], [100 * r[metric] for r in evals], marker="o")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(f"{metric} (%)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
