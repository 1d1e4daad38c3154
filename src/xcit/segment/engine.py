"""Small, task-independent training-engine pieces used by segmentation training.

Written here because the shared engine (``xcit.train``) did not exist when this package was
written; each piece is generic so it can move there unchanged: atomic checkpoint writes, JSON
Lines metrics, a poly schedule with linear warm-up driven by steps *or* a wall-clock budget,
``torchrun`` process-group set-up, and metric plots.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class JsonlLogger:
    """Appends one JSON object per line (flushed) to ``path``; a no-op when ``enabled`` is False."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}, allow_nan=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistContext:
    """Read ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group
    (NCCL on GPUs, Gloo on CPU). Without it: one process on ``device`` ("auto": CUDA if available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"expected an available device, got {device!r} but CUDA is not available")
        if world > 1:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision (e.g. 'time is up') shared with every process."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def plot_history(jsonl: str | os.PathLike, out: str | os.PathLike, metric: str = "miou") -> Path | None:
    """Training loss and learning rate, and eval ``metric``, against step, as one PNG."""
    records = read_jsonl(jsonl)
    # a resumed run appends: keep the last record of each step so the curves do not double back
    train = sorted({r["step"]: r for r in records if r.get("kind") == "train"}.values(), key=lambda r: r["step"])
    evals = sorted({r["step"]: r for r in records if r.get("kind") == "eval" and not math.isnan(r.get(metric, math.nan))}.values(),
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
