"""DINO's schedules: lr, weight decay and teacher momentum (cosine), teacher temperature (warm-up).

The values are those of the official code (facebookresearch/dino ``utils.cosine_scheduler`` and
the teacher-temperature schedule of ``DINOLoss``): a linear warm-up ``np.linspace(start, base, W)``
(its last step already at ``base``), then ``final + (base - final) / 2 * (1 + cos(pi * i / n))``
over the ``n`` remaining steps; the teacher temperature moves once per epoch (``linspace`` over
the warm-up epochs) unless ``teacher_temp_per_step``. All are plain objects of floats built from
the step counts, so a resumed run rebuilds them exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DinoCosine:
    """``utils.cosine_scheduler(base, final, ...)`` of DINO, evaluated at one step (0-based)."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start: float = 0.0

    def lr(self, step: int) -> float:
        step = min(max(step, 0), self.total_steps - 1)
        w = self.warmup_steps
        if step < w:  # np.linspace(start, base, w)
            return self.start if w == 1 else self.start + (self.base - self.start) * step / (w - 1)
        n = self.total_steps - w
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * (step - w) / n))


@dataclass(frozen=True)
class DinoSchedules:
    """Values at global step ``s`` of ``total_steps`` (``steps_per_epoch`` steps make an epoch)."""

    lr: DinoCosine
    weight_decay: DinoCosine
    momentum: DinoCosine
    temp_start: float
    temp_end: float
    temp_warmup_steps: int
    freeze_steps: int
    steps_per_epoch: int = 1
    temp_per_step: bool = False

    def teacher_temp(self, step: int) -> float:
        if step >= self.temp_warmup_steps:
            return self.temp_end
        if self.temp_per_step:
            return self.temp_start + (self.temp_end - self.temp_start) * step / self.temp_warmup_steps
        # DINO: np.linspace(start, end, warmup_epochs)[epoch], then end
        epochs = self.temp_warmup_steps // self.steps_per_epoch
        epoch = step // self.steps_per_epoch
        if epochs <= 1:
            return self.temp_start
        return self.temp_start + (self.temp_end - self.temp_start) * epoch / (epochs - 1)

    def at(self, step: int) -> dict[str, float]:
        return {"lr": self.lr.lr(step), "wd": self.weight_decay.lr(step), "momentum": self.momentum.lr(step),
                "teacher_temp": self.teacher_temp(step)}


def build_schedules(cfg, lr: float, steps_per_epoch: int, total_steps: int) -> DinoSchedules:
    """Schedules of a run of ``total_steps`` for ``cfg`` (a :class:`~xcit.dino.config.DinoConfig`).

    Warm-ups are given in epochs, as in DINO. Only a time-budgeted run (``cfg.time_budget_min``),
    whose length is unknown in advance, caps them: the lr warm-up at a tenth of the run and the
    teacher-temperature warm-up at half of it.
    """
    budgeted = bool(getattr(cfg, "time_budget_min", None))

    def steps(epochs: float, cap: float) -> int:
        n = int(epochs * steps_per_epoch)
        return int(min(n, cap * total_steps)) if budgeted else min(n, total_steps)

    temp_steps = steps(cfg.warmup_teacher_temp_epochs, 0.5)
    per_step = bool(getattr(cfg, "teacher_temp_per_step", False)) or budgeted
    return DinoSchedules(
        lr=DinoCosine(lr, cfg.min_lr, total_steps, steps(cfg.warmup_epochs, 0.1)),
        weight_decay=DinoCosine(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        momentum=DinoCosine(cfg.momentum_teacher, 1.0, total_steps),
        temp_start=cfg.warmup_teacher_temp, temp_end=cfg.teacher_temp, temp_warmup_steps=temp_steps,
        freeze_steps=min(int(cfg.freeze_last_layer * steps_per_epoch), total_steps),
        steps_per_epoch=steps_per_epoch, temp_per_step=per_step,
    )
