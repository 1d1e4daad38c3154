"""DINO's per-step schedules: lr, weight decay and teacher momentum (cosine), teacher temperature (warm-up).

All are plain objects of floats, built from the step counts, so a resumed run rebuilds them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..train.optim import WarmupCosine


@dataclass(frozen=True)
class DinoSchedules:
    """Values at global step ``s`` of ``total_steps`` (``steps_per_epoch`` steps make an epoch)."""

    lr: WarmupCosine
    weight_decay: WarmupCosine
    momentum: WarmupCosine
    temp_start: float
    temp_end: float
    temp_warmup_steps: int
    freeze_steps: int

    def teacher_temp(self, step: int) -> float:
        if step >= self.temp_warmup_steps:
            return self.temp_end
        return self.temp_start + (self.temp_end - self.temp_start) * step / self.temp_warmup_steps

    def at(self, step: int) -> dict[str, float]:
        return {"lr": self.lr.lr(step), "wd": self.weight_decay.lr(step), "momentum": self.momentum.lr(step),
                "teacher_temp": self.teacher_temp(step)}


def build_schedules(cfg, lr: float, steps_per_epoch: int, total_steps: int) -> DinoSchedules:
    """Schedules of a run of ``total_steps`` for ``cfg`` (a :class:`~xcit.dino.config.DinoConfig`).

    Warm-ups are given in epochs; when the run is shorter than a warm-up (a time budget), the lr
    warm-up is capped at a tenth of the run and the teacher-temperature warm-up at half of it.
    """
    def steps(epochs: float, cap: float) -> int:
        return int(min(epochs * steps_per_epoch, cap * total_steps))

    warmup = steps(cfg.warmup_epochs, 0.1)
    return DinoSchedules(
        lr=WarmupCosine(lr, total_steps, warmup, 0.0, cfg.min_lr),
        weight_decay=WarmupCosine(cfg.weight_decay, total_steps, 0, cfg.weight_decay, cfg.weight_decay_end),
        momentum=WarmupCosine(cfg.momentum_teacher, total_steps, 0, cfg.momentum_teacher, 1.0),
        temp_start=cfg.warmup_teacher_temp, temp_end=cfg.teacher_temp,
        temp_warmup_steps=steps(cfg.warmup_teacher_temp_epochs, 0.5),
        freeze_steps=steps(cfg.freeze_last_layer, 1.0),
    )
