"""The task protocol: what a training task brings to the one loop (:func:`xcit.train.fit`).

A task is its data, its model, its loss and its metrics. Everything a run needs around them is the
loop's and is the same for every task: seeding and the complete random and data-position state, resume,
the learning-rate and weight-decay schedule applied to the parameter groups, the time budget, the
log / evaluation / checkpoint cadence, autocast, the optimiser step, non-finite handling, best-checkpoint
selection, the progress bar, ``metrics.jsonl`` and ``result.json``.

The loop calls, in this order::

    task = Task(cfg, env)
    task.build(resuming)            # data and modules (CPU), fine-tuning weights; nothing written yet
    task.ready()                    # after task.model moved to the device (and its BatchNorm synchronised)
    sched = task.schedule(lr, total_steps, steps_per_epoch)
    for each step:                  # values = sched(step): lr (and wd, momentum, ...) for this step
        batch = task.prepare(raw)   # on the device; None when no image of it could be read
        loss, parts = task.loss(net, batch, values)      # under the run's autocast
        ... backward, task.before_update(step), optimiser step ...
        extra = task.after_step(step, values)            # EMA, teacher momentum, ...
    metrics = task.evaluate(final)  # at the cadence and at the end; metrics[task.primary] selects best.pt
    task.save_model(path, metrics)  # the file people use afterwards (model.pth / teacher.pth)

``task.state_dict()`` / ``load_state_dict`` carry what the task keeps besides the trained model's weights
(EMA, teacher, DINO's centre); ``checkpoint_fields()`` adds plain entries that make ``last.pt`` and
``best.pt`` loadable by the task's own predictors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import distributed as dist_utils
from .metrics import format_duration


@dataclass
class TrainData:
    """What a task trains on; the loop makes the sampler (epochs, ranks, resume, seeds) and the loader."""

    dataset: Any
    collate: Callable | None = None  # default: xcit.data.collate_skipping (unreadable images dropped, counted)
    batch_transform: Callable | None = None  # in-memory datasets: one transform over a whole batch
    repeats: int = 1  # DeiT / XCiT repeated augmentation: copies of each image per epoch


@dataclass
class Batch:
    """One training batch on the device: the task's own ``data``, its image count and the unreadable ones."""

    data: Any
    size: int
    skipped: int = 0


class Task:
    """Base of the four training tasks; a subclass overrides what its recipe needs (see the module docstring)."""

    options_type: ClassVar[type]  # the task's options dataclass (``<task>/config.py``)
    name: ClassVar[str] = "task"  # run folder prefix and the "task" of its state files
    command: ClassVar[str] = "xcit"  # the command that runs it, for messages
    wd_recipe: ClassVar[str] = "bias-norm"  # the official weight-decay rule (--wd-rule recipe)
    primary: ClassVar[str | None] = None  # the metric selecting best.pt (higher is better); None: no evaluation
    model_file: ClassVar[str] = "model.pth"  # the final weights, what prediction reads
    hint: ClassVar[str] = "Try a lower --lr, a longer warm-up, --clip-grad 1.0 or --amp none."

    def __init__(self, cfg: Any, env: dist_utils.DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.model: nn.Module | None = None
        self.amp_dtype: torch.dtype | None = None  # set by the loop before ready()

    # ------------------------------------------------------------------------------ building
    def build(self, resuming: bool) -> None:
        """Read the data and build ``self.model`` (the module the optimiser trains) on the CPU. Every error in the
        data, options or weights is raised here, before the run folder is touched. A resumed run's weights are
        loaded afterwards by the loop, so fine-tuning weights need not be read when ``resuming``."""
        raise NotImplementedError

    def ready(self) -> None:
        """``self.model`` is on the device (BatchNorm synchronised across processes): build what depends on it."""

    def train_data(self) -> TrainData:
        raise NotImplementedError

    def inputs(self) -> list[str]:
        """Files the run reads (weights, a teacher): never deleted or replaced by its run folder."""
        return []

    def run_name(self) -> list[str]:
        """Parts of the default run folder name (``runs/<task>-<parts>-<time>``)."""
        return []

    def param_groups(self, rule: str) -> list[dict]:
        """The optimiser's parameter groups under a weight-decay rule (each with ``decayed`` and ``lr_scale``)."""
        from .optim import param_groups_by_rule

        return param_groups_by_rule(self.model, rule, self.cfg.weight_decay,
                                    exempt_per_channel=self.cfg.wd_exempt_per_channel)

    def optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        from .optim import adamw

        return adamw(groups, lr)

    def schedule(self, lr: float, total_steps: int, steps_per_epoch: int) -> Callable[[int], dict[str, float]]:
        """Values at a step: ``lr`` (the peak ``lr`` scaled by the schedule), optionally ``wd`` (applied to the
        decayed groups) and any other value the task's step reads (teacher momentum, temperature)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- each step
    def prepare(self, raw: Any) -> Batch | None:
        """A loader batch on the device; None when it holds no readable image."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Batch, values: dict[str, float]) -> tuple[torch.Tensor, dict]:
        """(total loss, named parts) of a batch; ``net`` is ``self.model`` or its data-parallel wrapper."""
        raise NotImplementedError

    def before_update(self, step: int) -> None:
        """After the backward pass and clipping, before the optimiser update (e.g. freeze a layer)."""

    def after_step(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """After the update (EMA, teacher momentum); returns extra values for the step record."""
        return {}

    # ------------------------------------------------------------------------------ results
    def evaluate(self, final: bool) -> dict[str, Any] | None:
        """Metrics of the current weights (``final``: the weights the run reports); None without evaluation."""
        return None

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """One line for the log."""
        return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))

    def save_model(self, path: Path, metrics: dict[str, Any] | None, train_info: dict) -> Path:
        """Write the final weights to ``path`` (the task's ``model_file``), with what prediction needs."""
        raise NotImplementedError

    def plot(self, run_dir: Path) -> Path | None:
        from .plots import plot_run

        return plot_run(run_dir, primary=self.primary)

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What the task keeps besides the trained weights (EMA, teacher, centre): entries of ``last.pt``
        beside the loop's own (``task``, ``options``, ``step``, ``model``, ``optimizer``, ``rng``, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, from the whole state file."""

    def checkpoint_fields(self) -> dict[str, Any]:
        """Plain entries of ``last.pt`` / ``best.pt`` beside the weights (e.g. the dense tasks' format and
        architecture, which make them loadable by ``xcit segment predict``)."""
        return {}

    def describe(self) -> list[str]:
        """Lines for the log at the start of a run."""
        return []

    def derived(self) -> dict[str, Any]:
        """Values derived from the options, saved under ``_derived`` in ``config.yaml``."""
        return {}


@dataclass
class FitResult:
    """What a run produced and where: the same fields for every task (also in ``result.json``)."""

    task: str
    run_dir: Path
    status: str
    steps: int
    epochs: float
    wall_time: float
    train_loss: float | None
    metrics: dict[str, Any]
    primary: str | None
    best: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def model_path(self) -> Path | None:
        """The final weights (``model.pth``; DINO: ``teacher.pth``)."""
        return self.files.get("model")

    def summary(self) -> str:
        lines = [f"run: {self.run_dir}  ({self.status}, {self.epochs:.2f} epochs, {self.steps} steps, "
                 f"{format_duration(self.wall_time)})"]
        if self.primary and self.primary in self.metrics:
            shown = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            lines.append("final " + "  ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}"
                                              for k, v in list(shown.items())[:8]))
        if self.best:
            lines.append(f"best {self.primary} {self.best['value']:.4g} at step {self.best['step']}")
        for key in ("model", "best", "last", "log", "metrics", "plot", "config"):
            if key in self.files:
                lines.append(f"  {key:<8} {self.files[key]}")
        return "\n".join(lines)
