"""The one training loop: :func:`fit` runs every training task (classification, DINO, detection, segmentation).

It is the only place that iterates over training batches, so every guarantee is written once here:

* **Exact resume.** The data order and every augmentation are functions of (seed, epoch, position)
  (:class:`~xcit.data.EpochSampler`); the model-side generators (dropout, drop path, mixup, detector
  scale jitter) of every process are saved in ``last.pt`` and restored. A run killed at any point and
  resumed from its last checkpoint ends bit-identical to an uninterrupted run on the same machine with
  the same number of processes and threads.
* **Schedules.** The task's schedule gives the learning rate (and weight decay, momentum, ...) at each
  step; the loop sets them on the parameter groups. The peak rate is ``--lr``, or ``--lr-base`` scaled
  by global batch / ``--lr-base-size`` (:func:`~xcit.train.options.resolve_lr`).
* **Time budget.** With ``--time-budget-min`` the speed is measured on the first steps, then again every
  few steps, and the run's total steps are set to what fits; every schedule follows the new total, so it
  anneals to its end when the time is up (:class:`TimeBudget`).
* **Non-finite loss.** The step is refused before the update (:class:`~xcit.train.run.OptimStep`), the run
  stops with one line naming the last good checkpoint, which is left as it was, ``result.json`` says
  why, and the command exits with status 1.
* **Cadences.** Step metrics every ``--log-every`` steps; evaluation every ``--eval-every`` (steps or
  epochs) and at the end, the best by the task's primary metric kept as ``best.pt``; ``last.pt`` every
  ``--ckpt-every``, after every evaluation and at the end.
* **One result.** ``result.json`` and the returned :class:`~xcit.train.task.FitResult` have the same
  fields for every task.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.loader import EpochSampler, build_loader
from ..models.weights import CheckpointError
from . import distributed as dist_utils
from .checkpoint import load_state, rng_state, set_rng_state
from .options import RUNTIME_OPTIONS, every, rename_options, resolve_lr, saved_run_options
from .budget import TimeBudget
from .metrics import Meter, format_duration, progress_bar
from .run import (
    NonFiniteLossError,
    OptimStep,
    Run,
    RunFolderError,
    autocast_context,
    default_run_name,
    in_use,
    resolve_amp,
    resume_file,
    run_process,
    seed_everything,
    set_threads,
)
from .task import Batch, FitResult, Task

log = logging.getLogger("xcit.train")


def fit(task_type: type[Task], config: Any, options: dict[str, Any], resolve: Callable[..., Any],
        validate: Callable[[Any], None]) -> FitResult:
    """Train ``task_type`` as ``config`` says (its options dataclass, or values resolved by ``resolve``;
    ``options`` override them): the ``train`` function of every task.

    Raises ``ValueError`` (bad options), :class:`~xcit.data.DataError`, :class:`~xcit.models.CheckpointError`
    before anything is written; :class:`NonFiniteLossError` if the loss diverges (the last good checkpoint is
    kept); ``KeyboardInterrupt`` on Ctrl-C / SIGTERM (``--resume`` continues from the last checkpoint).
    """
    options_type = task_type.options_type
    if isinstance(config, options_type):
        validate(config)
        cfg = resolve({**config.to_dict(), **options}) if options else config
    else:
        given = {**(config or {}), **options}
        if given.get("resume"):  # what is not given again comes from the run's saved options
            given = {**saved_run_options(str(given["resume"]), given.get("output")), **given}
        cfg = resolve(given)
    with run_process(cfg.device, cfg.dist_backend) as env:
        return _fit(task_type, cfg, env, validate)


def _fit(task_type: type[Task], cfg: Any, env: dist_utils.DistEnv, validate: Callable[[Any], None]) -> FitResult:
    state = None
    if cfg.resume:
        path = resume_file(cfg.resume, cfg.output)
        locked = dist_utils.broadcast_object(in_use(path.parent) if env.is_main else None, env)
        if locked:  # before the state is read: never two processes training in one run
            raise RunFolderError(locked)
        state = load_state(path, task_type.name, task_type.command)
        cfg = _resumed_options(cfg, state["options"], validate)
    thread_note = set_threads(cfg.threads, env)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    task = task_type(cfg, env)
    task.amp_dtype = resolve_amp(cfg.amp, env.device)
    task.build(resuming=state is not None)  # every error in data, options and weights is found here
    data = task.train_data()
    sampler = EpochSampler(len(data.dataset), num_replicas=env.world_size, rank=env.rank, repeats=data.repeats,
                           seed=cfg.seed, min_samples=cfg.batch_size, with_seeds=True)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    loader = build_loader(data.dataset, sampler, cfg.batch_size, batch_transform=data.batch_transform,
                          collate_fn=data.collate, workers=cfg.workers, drop_last=True,
                          pin_memory=env.device.type == "cuda")
    global_batch = cfg.batch_size * env.world_size
    if len(data.dataset) < global_batch:
        thread_note += (f"{'; ' if thread_note else ''}the training data hold {len(data.dataset)} images, fewer than "
                        f"one global batch of {global_batch}: images repeat within every batch")
    lr, lr_from = resolve_lr(cfg, global_batch)
    total = cfg.iters or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if state is not None:
        saved = state["options"]
        if (saved.get("epochs"), saved.get("iters")) == (cfg.epochs, cfg.iters):
            total = int(state["total_steps"])  # as the run had it (a time budget may have fitted it)
        else:
            thread_note += f"{'; ' if thread_note else ''}the run's length changed to {total} steps"
    run = Run.open(cfg, env, default_run_name(task.name, *task.run_name()), resuming=state is not None,
                   output=Path(state["path"]).parent if state is not None and not cfg.output else None,
                   elapsed_before=float(state["elapsed"]) if state else 0.0, inputs=task.inputs(),
                   need_bytes=run_bytes(task.model))
    try:
        return Training(task, run, state, sampler, loader, steps_per_epoch, total, (lr, lr_from), thread_note).fit()
    finally:
        run.close()


class Training:
    """One run of a task between its set-up and its result: the model wrapped for the processes, the optimiser,
    the schedule and every counter, with one method per event of the loop."""

    def __init__(self, task: Task, run: Run, state: dict | None, sampler: EpochSampler, loader: Any,
                 steps_per_epoch: int, total: int, lr: tuple[float, str], note: str) -> None:
        cfg, env = task.cfg, task.env
        self.task, self.cfg, self.env, self.run, self.sampler, self.loader = task, cfg, env, run, sampler, loader
        self.steps_per_epoch, self.total, (self.lr, self.lr_from), self.note = steps_per_epoch, total, lr, note
        model = task.model.to(env.device)
        if env.distributed and cfg.sync_bn:  # before the optimiser: the swap makes new BatchNorm modules (same keys)
            model = dist_utils.convert_batchnorm(model, env.device)
        task.model = self.model = model
        task.ready()
        self.net = model
        if env.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device] if env.device.type == "cuda" else None)
        self.rule = task.wd_recipe if cfg.wd_rule == "recipe" else cfg.wd_rule
        self.optimizer = task.optimizer(task.param_groups(self.rule), self.lr)
        self.step_fn = OptimStep(self.optimizer, [p for p in model.parameters() if p.requires_grad], env,
                                 task.amp_dtype, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_grad_mode, hint=task.hint)
        self.step, self.best = 0, None
        if state is not None:
            self.restore(state)
        seed_everything(cfg.seed + env.rank)  # dropout, drop path and mixup differ between ranks
        if state is not None:
            _restore_rng(state["rng"], env)
            log.info("resuming %s at step %d of %d (%.1f min trained)", state["path"], self.step, total,
                     run.elapsed_before / 60)
        self.budget = TimeBudget(cfg.time_budget_min, run, self.step, total)
        self.schedule = task.schedule(self.lr, total, steps_per_epoch)
        self.meter = Meter()
        self.skipped, self.skipped_logged = 0, 0  # unreadable training images: in all, and up to the last epoch line
        self.last_batch: Batch | None = None
        self.values: dict[str, float] = {}

    def restore(self, state: dict) -> None:
        """The weights, optimiser, task state and counters of a resumed run."""
        self.step, self.best = int(state["step"]), state.get("best")
        try:
            self.model.load_state_dict(state["model"])
            self.task.load_state_dict(state)
            self.step_fn.load_state_dict({"optimizer": state["optimizer"], "scaler": state.get("scaler"),
                                          "steps": self.step})
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{state['path']} does not fit this run's model or optimiser: {err}") from None

    def derived(self) -> dict[str, Any]:
        """What the run derived from its options (``config.yaml``'s ``_derived``)."""
        cfg, env, task = self.cfg, self.env, self.task
        return {"lr": self.lr, "lr_from": self.lr_from, "global_batch": cfg.batch_size * env.world_size,
                "world_size": env.world_size, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total,
                "epochs": round(self.total / self.steps_per_epoch, 4), "wd_rule": self.rule, "device": str(env.device),
                "amp": str(task.amp_dtype).replace("torch.", "") if task.amp_dtype else "none",
                "torch_threads": torch.get_num_threads(), **task.derived()}

    def save_last(self) -> None:
        """``last.pt``: everything the run needs to go on exactly from this step (every process takes part)."""
        rngs = dist_utils.gather_object(rng_state(), self.env)
        task, step, optim = self.task, self.step, self.step_fn.state_dict()
        self.run.save("last.pt", lambda: {
            "task": task.name, "command": task.command, "options": self.cfg.to_dict(), "derived": self.derived(),
            "step": step, "total_steps": self.total, "epoch": step / self.steps_per_epoch,
            "elapsed": self.run.elapsed(), "best": self.best, "rng": rngs, "model": self.model.state_dict(),
            "optimizer": optim["optimizer"], "scaler": optim["scaler"], **task.state_dict(),
            **task.checkpoint_fields()})

    def evaluate(self, final: bool) -> dict[str, Any] | None:
        """Evaluate, record, keep ``last.pt`` (and ``best.pt`` when the primary metric improved), redraw the plot."""
        task, run, step = self.task, self.run, self.step
        if task.primary is None:
            return None
        metrics = task.evaluate(final)
        epoch = step / self.steps_per_epoch
        run.write("eval", step, epoch=epoch, final=final, elapsed=round(run.elapsed(), 1),
                  **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict, str))})
        log.info("[eval] step %d (epoch %.2f)%s: %s", step, epoch, " final" if final else "",
                 task.format_metrics(metrics))
        value = metrics[task.primary]
        improved = self.best is None or (math.isfinite(value) and value > self.best["value"])
        if improved:
            self.best = {"metric": task.primary, "value": value, "step": step, "epoch": epoch}
        self.save_last()
        if improved:
            run.copy("last.pt", "best.pt")
        if self.cfg.plot:
            run.plot(task.plot)
        return metrics

    def describe(self) -> None:
        cfg, env = self.cfg, self.env
        for line in [*self.task.describe(), self.note]:
            if line:
                log.info(line)
        log.info("%d steps (%.2f epochs of %d), global batch %d (--batch-size %d x %d process(es)), lr %.3g (%s), "
                 "weight decay %g (%s rule), amp %s on %s, %d thread(s)%s -> %s", self.total,
                 self.total / self.steps_per_epoch, self.steps_per_epoch, cfg.batch_size * env.world_size,
                 cfg.batch_size, env.world_size, self.lr, self.lr_from, cfg.weight_decay, self.rule,
                 self.derived()["amp"], env.device, torch.get_num_threads(),
                 f", time budget {cfg.time_budget_min:g} min" if cfg.time_budget_min else "", self.run.path)

    def fit(self) -> FitResult:
        """Train to the end (or the time budget), evaluate, write the model and the result."""
        cfg, run = self.cfg, self.run
        run.save_config(cfg.to_dict(), self.derived())
        self.describe()
        self.bar = progress_bar(self.total, self.task.name, cfg.progress and self.env.is_main)
        self.bar.update(self.step)
        self.model.train()
        stopped_by = None
        try:
            while self.step < self.total and stopped_by is None:
                stopped_by = self.epoch()
        except NonFiniteLossError as err:
            where = run.path / "last.pt" if (run.path / "last.pt").exists() else "none yet (no checkpoint before it)"
            log.error("%s Last good checkpoint: %s", err, where)
            self.stop("stopped: non-finite loss", str(err), error=str(err))
            raise NonFiniteLossError(f"{err} Last good checkpoint: {where}") from None
        except KeyboardInterrupt:
            self.stop("interrupted", "interrupted", resume=f"--resume {run.path}")
            raise
        self.bar.close()
        if stopped_by:
            log.info("stopped at step %d by the %s", self.step, stopped_by)
        return self.finish(stopped_by)

    def epoch(self) -> str | None:
        """The rest of the current epoch; what stopped the run early, if anything."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, offset * self.cfg.batch_size)
        ran = False
        for raw in self.loader:
            fitted = self.budget.fit(self.step, self.total)
            if fitted is not None and fitted != self.total:
                self.total, self.bar.total = fitted, fitted
                self.schedule = self.task.schedule(self.lr, fitted, self.steps_per_epoch)
                self.run.save_config(self.cfg.to_dict(), self.derived())
            if self.step >= self.total:
                return "time budget"
            self.train_step(raw)
            ran = True
            if self.step % self.steps_per_epoch == 0 or self.step >= self.total:
                break
        if ran and self.step % self.steps_per_epoch == 0:
            self.end_epoch()
        return None

    def train_step(self, raw: Any) -> None:
        """One batch: schedule, loss under autocast, optimiser step, the task's extras, then the cadences."""
        cfg, env, task = self.cfg, self.env, self.task
        self.values = values = self.schedule(self.step)
        _apply(self.optimizer, values)
        batch = task.prepare(raw)
        self.skipped += batch.skipped
        weight = 1.0
        if batch.size == 0:  # no image of the batch could be read (each listed in train.log)
            if not env.distributed or self.last_batch is None:
                self.step += 1
                self.bar.update(1)
                return
            batch, weight = self.last_batch, 0.0  # keep the processes in step; this batch adds no gradient
        self.last_batch = batch
        with autocast_context(env.device, task.amp_dtype):
            loss, parts = task.loss(self.net, batch, values)
        step = self.step
        value = self.step_fn(loss.float(), weight=weight, parts=parts, before_update=lambda: task.before_update(step))
        extra = task.after_step(step, values)
        self.step += 1
        self.bar.update(1)
        self.meter.add(value, parts, batch.size * env.world_size if weight else 0)
        if self.step % cfg.log_every == 0 or self.step == self.total:
            self.log_step(values, extra)
        if self.step < self.total:
            if _due(cfg.eval_every, self.step, self.steps_per_epoch):
                self.evaluate(final=False)
            elif _due(cfg.ckpt_every, self.step, self.steps_per_epoch):
                self.save_last()

    def log_step(self, values: dict[str, float], extra: dict[str, float]) -> None:
        record = self.meter.flush()
        epoch = self.step / self.steps_per_epoch
        self.run.write("step", self.step, epoch=epoch, **record, **values, **extra)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if self.bar.disable and self.cfg.progress:
            log.info("step %d/%d (epoch %.2f)  loss %.4f  lr %.2e  %.1f img/s  elapsed %s  ETA %s", self.step,
                     self.total, epoch, record["loss"], values["lr"], record["img_per_s"],
                     format_duration(self.run.elapsed()), format_duration(self.budget.eta(self.step, self.total)))

    def end_epoch(self) -> None:
        record = self.meter.end_epoch()
        skipped = int(dist_utils.all_reduce_sum(torch.tensor([self.skipped - self.skipped_logged]), self.env)[0])
        self.skipped_logged = self.skipped
        epochs = self.step // self.steps_per_epoch
        self.run.write("epoch", self.step, epoch=epochs - 1, lr=self.values["lr"], skipped_images=skipped,
                       elapsed=round(self.run.elapsed(), 1), **record)
        log.info("epoch %d/%.4g  train loss %.4f  lr %.2e  (%s, %.0f img/s, elapsed %s, ETA %s)%s", epochs,
                 self.total / self.steps_per_epoch, record["train_loss"], self.values["lr"],
                 format_duration(record["epoch_time"]), record["epoch_img_per_s"], format_duration(self.run.elapsed()),
                 format_duration(self.budget.eta(self.step, self.total)),
                 f"  skipped {skipped} unreadable image(s) (listed in train.log)" if skipped else "")

    def stop(self, status: str, reason: str, **extra: Any) -> None:
        """``result.json`` of a run that did not finish (no collective call: one process may stop alone)."""
        self.bar.close()
        self.run.write("stop", self.step, reason=reason)
        if self.cfg.plot:
            self.run.plot(self.task.plot)
        self.run.finish(status, **self.result_fields(None, self.skipped), **extra)

    def finish(self, stopped_by: str | None) -> FitResult:
        """The last state, the final evaluation, the model file, the plot and the result."""
        env, run, task = self.env, self.run, self.task
        skipped = int(dist_utils.all_reduce_sum(torch.tensor([self.skipped]), env)[0])
        self.save_last()
        metrics = self.evaluate(final=True) or {}
        if env.is_main:
            info = {"task": task.name, "steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 4),
                    "wall_time": round(run.elapsed(), 1), "lr": self.lr,
                    "global_batch": self.cfg.batch_size * env.world_size}
            run.files["model"] = task.save_model(run.path / task.model_file, metrics or None, info)
        if self.cfg.plot:
            run.plot(task.plot)
        if skipped or metrics.get("skipped"):
            log.warning("skipped unreadable images: %d in training (all epochs), %d of %d in evaluation (listed in "
                        "%s)", skipped, metrics.get("skipped", 0), metrics.get("skipped", 0) + metrics.get("n", 0),
                        run.files["log"])
        dist_utils.barrier(env)
        fields_ = self.result_fields(metrics, skipped)
        record = run.finish("completed", **fields_, stopped_by=stopped_by)
        result = FitResult(task.name, run.path, "completed", self.step, fields_["epochs"], record["wall_time"],
                           fields_["train_loss"], metrics, task.primary, self.best, dict(run.files))
        log.info(result.summary())
        return result

    def result_fields(self, metrics: dict | None, skipped_train: int) -> dict[str, Any]:
        """The fields of ``result.json`` every task writes (``status``, ``wall_time`` and ``files`` are the run's)."""
        metrics = metrics or {}
        return {"task": self.task.name, "command": self.task.command, "steps": self.step,
                "epochs": round(self.step / self.steps_per_epoch, 4), "train_loss": self.meter.last_loss,
                "primary": self.task.primary, "metrics": metrics, "best": self.best,
                "skipped_images": {"train": skipped_train, "val": int(metrics.get("skipped", 0))}}


def _due(cadence_: str, step: int, steps_per_epoch: int) -> bool:
    """Whether a cadence (``N`` steps, ``Nep`` epochs, ``0`` never) falls on ``step``."""
    interval = every(cadence_, steps_per_epoch)
    return bool(interval) and step % interval == 0


def run_bytes(model: nn.Module) -> int:
    """About what a run's files take: ``last.pt`` and ``best.pt`` (weights and two AdamW moments each), the model
    file, and a few MiB of logs, metrics and figures."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 7 * weights + 4 * 2**20


def _apply(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """This step's learning rate (times each group's ``lr_scale``) and, when scheduled, weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = values["lr"] * group.get("lr_scale", 1.0)
        if "wd" in values and group.get("decayed", True):
            group["weight_decay"] = values["wd"]


def _restore_rng(states: list | dict, env: dist_utils.DistEnv) -> None:
    states = states if isinstance(states, list) else [states]
    if len(states) == env.world_size:
        set_rng_state(states[env.rank])
    else:
        log.warning("the run was saved by %d process(es) and resumes on %d: it continues, but not bit-identical to "
                    "an uninterrupted run", len(states), env.world_size)


def _resumed_options(cfg: Any, saved: dict, validate: Callable[[Any], None]) -> Any:
    """The run's saved options, with only the runtime ones (``RUNTIME_OPTIONS``) taken from ``cfg``."""
    known = [f.name for f in fields(cfg)]
    saved = {k: v for k, v in rename_options(saved, known).items() if k in known}
    ignored = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_OPTIONS and k in saved and saved[k] != v]
    if ignored:
        log.warning("resuming with the run's saved options; ignored new value(s) for: %s", ", ".join(ignored))
    resumed = type(cfg)(**{**saved, **{k: getattr(cfg, k) for k in RUNTIME_OPTIONS}, "overwrite": False})
    validate(resumed)
    return resumed
