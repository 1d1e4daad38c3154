"""The run figure (``curves.png``) of every task, from ``metrics.jsonl``: loss, evaluation, schedules."""
from __future__ import annotations

import math
from pathlib import Path

from .metrics import read_metrics

# Step-record keys that are not schedule values (everything else numeric in a step record is plotted as one)
_NOT_SCHEDULES = {"kind", "step", "time", "epoch", "loss", "img_per_s", "teacher_entropy"}


def plot_run(run_dir: str | Path, out: str | Path | None = None, primary: str | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` as a 3-panel PNG (default ``run_dir/curves.png``): the training loss
    (per logged step and per epoch), the evaluations (``primary`` first, in %, when it is a fraction or a
    percentage) and the schedules (learning rate, and any other scheduled value, each divided by its peak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir} has no metrics.jsonl to plot")

    def last_per_step(kind: str) -> list[dict]:  # a resumed run appends: the last record of a step wins
        by_step = {r["step"]: r for r in records if r.get("kind") == kind}
        return [by_step[k] for k in sorted(by_step)]

    steps, epochs, evals = last_per_step("step"), last_per_step("epoch"), last_per_step("eval")
    parts = sorted({k for r in steps for k in r if k.startswith("loss_") or k.endswith("_loss")} - {"loss"})
    schedules = [k for k in (steps[-1] if steps else {}) if k not in _NOT_SCHEDULES and k not in parts
                 and isinstance(steps[-1][k], (int, float))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if steps:
        ax.plot([r["epoch"] for r in steps], [_num(r["loss"]) for r in steps], lw=0.8, alpha=0.7,
                label="train (logged)")
        for key in parts[:4]:
            ax.plot([r["epoch"] for r in steps], [_num(r.get(key)) for r in steps], lw=0.6, alpha=0.6, label=key)
    if epochs:
        ax.plot([r["epoch"] + 1 for r in epochs], [_num(r.get("train_loss")) for r in epochs], "o-",
                label="train (epoch mean)")
    ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax.legend(fontsize=8)

    ax = axes[1]
    if evals:
        keys = [k for k in evals[-1] if isinstance(evals[-1][k], (int, float)) and not isinstance(evals[-1][k], bool)
                and k not in ("step", "time", "epoch", "elapsed", "n", "skipped", "loss")]
        keys = sorted(keys, key=lambda k: (k != primary, k))[:6]
        for key in keys:
            values = [_num(r.get(key)) for r in evals]
            scale = 100.0 if all(0 <= v <= 1 for v in values if math.isfinite(v)) else 1.0
            ax.plot([r["epoch"] for r in evals], [v * scale for v in values], "o-" if key == primary else ".--",
                    label=key + (" (primary)" if key == primary else ""))
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="%", title="evaluation")

    ax = axes[2]
    for key in schedules:
        values = [_num(r.get(key)) for r in steps]
        peak = max((abs(v) for v in values if math.isfinite(v)), default=1.0) or 1.0
        ax.plot([r["epoch"] for r in steps], [v / peak for v in values], label=f"{key} / {peak:.3g}")
    ax.set(xlabel="epoch", title="schedules (each / its peak)")
    if schedules:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
