"""The end-of-run figure: loss, accuracy and learning-rate curves from ``metrics.jsonl``."""
from __future__ import annotations

import math
import os
from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` as a 3-panel PNG (default ``run_dir/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir} has no metrics.jsonl to plot")
    # A resumed run appends: keep the last record for each step so curves do not double back.
    steps = {r["step"]: r for r in records if r["kind"] == "step"}
    epochs = {r["epoch"]: r for r in records if r["kind"] == "epoch"}
    steps = [steps[k] for k in sorted(steps)]
    epochs = [epochs[k] for k in sorted(epochs)]
    steps_per_epoch = max(1, epochs[0]["step"] // (epochs[0]["epoch"] + 1)) if epochs else 1

    # The training loss is taken against smoothed / mixed targets when those are on; say so.
    note = _train_loss_note(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if steps:
        ax.plot([r["step"] / steps_per_epoch for r in steps], [_num(r["loss"]) for r in steps],
                lw=0.8, alpha=0.6, label=f"train (steps){note}")
    if epochs:
        x = [r["epoch"] + 1 for r in epochs]
        ax.plot(x, [_num(r.get("train_loss")) for r in epochs], "o-", label="train (epoch mean)")
        if any("val_loss" in r for r in epochs):
            ax.plot(x, [_num(r.get("val_loss")) for r in epochs], "s-", label="eval")
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    if epochs:
        x = [r["epoch"] + 1 for r in epochs]
        for key, label, style in (("val_top1", "eval top-1", "o-"), ("val_top5", "eval top-5", "^--"),
                                  ("ema_top1", "EMA top-1", "s-")):
            points = [(xi, r[key]) for xi, r in zip(x, epochs) if key in r]
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.legend()
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax.grid(alpha=0.3)

    ax = axes[2]
    if steps:
        ax.plot([r["step"] / steps_per_epoch for r in steps], [_num(r["lr"]) for r in steps])
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate (per step)")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _train_loss_note(run_dir: Path) -> str:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return ""
    cfg = yaml.safe_load(path.read_text()) or {}
    parts = []
    if cfg.get("smoothing"):
        parts.append(f"label smoothing {cfg['smoothing']}")
    if cfg.get("mixup") or cfg.get("cutmix"):
        parts.append("mixup/cutmix")
    if cfg.get("teacher"):
        parts.append("distillation")
    return f", {', '.join(parts)}" if parts else ""


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_history(jsonl: str | os.PathLike, out: str | os.PathLike, metric: str = "miou") -> Path | None:
    """Training loss and learning rate, and eval ``metric``, against step, as one PNG (the figure of
    ``xcit segment train`` and ``xcit detect train``: "train" and "eval" records)."""
    records = read_metrics(Path(jsonl))
    # a resumed run appends: keep the last record of each step so the curves do not double back
    train = sorted({r["step"]: r for r in records if r.get("kind") == "train"}.values(), key=lambda r: r["step"])
    evals = sorted({r["step"]: r for r in records if r.get("kind") == "eval" and math.isfinite(_num(r.get(metric)))}.values(),
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
