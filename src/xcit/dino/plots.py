"""The end-of-pretraining figure: DINO loss, teacher entropy and the schedules, from ``metrics.jsonl``."""
from __future__ import annotations

from pathlib import Path

from ..train.metrics import read_metrics


def plot_pretraining(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` of ``xcit dino`` as a 3-panel PNG (default ``run_dir/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    by_step = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"}
    rows = [by_step[s] for s in sorted(by_step)]  # a resumed run appends: the last record of a step wins
    if not rows:
        raise ValueError(f"{run_dir} has no step records in metrics.jsonl to plot")
    epoch = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_ent, ax_sched) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(epoch, [float(r["loss"]) for r in rows], lw=1)
    ax_loss.set(xlabel="epoch", ylabel="DINO loss", title="loss (cross-entropy teacher -> student)")
    ax_ent.plot(epoch, [float(r["teacher_entropy"]) for r in rows], lw=1, color="tab:green")
    ax_ent.set(xlabel="epoch", ylabel="nats", title="entropy of the teacher's distributions")
    for key, label in (("lr", "lr / peak"), ("wd", "weight decay / max"), ("teacher_temp", "teacher temp / max")):
        values = [float(r[key]) for r in rows]
        peak = max(values) or 1.0
        ax_sched.plot(epoch, [v / peak for v in values], label=label)
    ax_sched.plot(epoch, [(float(r["momentum"]) - 0.9) / 0.1 for r in rows], label="(momentum - 0.9) / 0.1")
    ax_sched.set(xlabel="epoch", title="schedules (scaled)")
    ax_sched.legend(fontsize=8)
    for ax in (ax_loss, ax_ent, ax_sched):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
