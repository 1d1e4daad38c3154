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
import time
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
from .metrics import format_duration, progress_bar
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
                   elapsed_before=float(state["elapsed"]) if state else 0.0)
    try:
        return _train(task, cfg, env, run, state, sampler, loader, steps_per_epoch, total, lr, lr_from, thread_note)
    finally:
        run.close()


def _train(task: Task, cfg: Any, env: dist_utils.DistEnv, run: Run, state: dict | None, sampler: EpochSampler,
           loader: Any, steps_per_epoch: int, total: int, lr: float, lr_from: str, thread_note: str) -> FitResult:
    model = task.model.to(env.device)
    if env.distributed and cfg.sync_bn:  # before the optimiser: the swap makes new BatchNorm modules (same keys)
        model = dist_utils.convert_batchnorm(model, env.device)
    task.model = model
    task.ready()
    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    rule = task.wd_recipe if cfg.wd_rule == "recipe" else cfg.wd_rule
    optimizer = task.optimizer(task.param_groups(rule), lr)
    step_fn = OptimStep(optimizer, [p for p in model.parameters() if p.requires_grad], env, task.amp_dtype,
                        clip_grad=cfg.clip_grad, clip_mode=cfg.clip_grad_mode, hint=task.hint)
    step, best = 0, None
    if state is not None:
        step, best = int(state["step"]), state.get("best")
        try:
            model.load_state_dict(state["model"])
            task.load_state_dict(state)
            step_fn.load_state_dict({"optimizer": state["optimizer"], "scaler": state.get("scaler"), "steps": step})
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{state['path']} does not fit this run's model or optimiser: {err}") from None
    seed_everything(cfg.seed + env.rank)  # dropout, drop path and mixup differ between ranks
    if state is not None:
        _restore_rng(state["rng"], env)
        log.info("resuming %s at step %d of %d (%.1f min trained)", state["path"], step, total,
                 run.elapsed_before / 60)

    budget = TimeBudget(cfg.time_budget_min, run, step, total)
    schedule = task.schedule(lr, total, steps_per_epoch)

    def derived() -> dict:
        return {"lr": lr, "lr_from": lr_from, "global_batch": cfg.batch_size * env.world_size,
                "world_size": env.world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total,
                "epochs": round(total / steps_per_epoch, 4), "wd_rule": rule, "device": str(env.device),
                "amp": str(task.amp_dtype).replace("torch.", "") if task.amp_dtype else "none",
                "torch_threads": torch.get_num_threads(), **task.derived()}

    def save_last() -> None:
        rngs = dist_utils.gather_object(rng_state(), env)  # every process's generators (all ranks take part)
        run.save("last.pt", lambda: {
            "task": task.name, "command": task.command, "options": cfg.to_dict(), "derived": derived(),
            "step": step, "total_steps": total, "epoch": step / steps_per_epoch, "elapsed": run.elapsed(),
            "best": best, "rng": rngs, "model": model.state_dict(), **_optim_state(step_fn),
            **task.state_dict(), **task.checkpoint_fields()})

    def evaluate(final: bool) -> dict | None:
        nonlocal best
        if task.primary is None:
            return None
        metrics = task.evaluate(final)
        run.write("eval", step, epoch=step / steps_per_epoch, final=final, elapsed=round(run.elapsed(), 1),
                  **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict, str))})
        log.info("[eval] step %d (epoch %.2f)%s: %s", step, step / steps_per_epoch, " final" if final else "",
                 task.format_metrics(metrics))
        value = metrics[task.primary]
        improved = best is None or (math.isfinite(value) and value > best["value"])
        if improved:
            best = {"metric": task.primary, "value": value, "step": step, "epoch": step / steps_per_epoch}
        save_last()
        if improved:
            run.copy("last.pt", "best.pt")
        if cfg.plot:
            run.plot(task.plot)
        return metrics

    run.save_config(cfg.to_dict(), derived())
    for line in [*task.describe(), thread_note]:
        if line:
            log.info(line)
    log.info("%d steps (%.2f epochs of %d), global batch %d (--batch-size %d x %d process(es)), lr %.3g (%s), "
             "weight decay %g (%s rule), amp %s on %s, %d thread(s)%s -> %s", total, total / steps_per_epoch,
             steps_per_epoch, cfg.batch_size * env.world_size, cfg.batch_size, env.world_size, lr, lr_from,
             cfg.weight_decay, rule, derived()["amp"], env.device, torch.get_num_threads(),
             f", time budget {cfg.time_budget_min:g} min" if cfg.time_budget_min else "", run.path)

    eval_every, ckpt_every = every(cfg.eval_every, steps_per_epoch), every(cfg.ckpt_every, steps_per_epoch)
    meter = Meter(env)
    skipped_train = skipped_before = 0
    status, stopped_by = "completed", None
    bar = progress_bar(total, task.name, cfg.progress and env.is_main)
    bar.update(step)
    last_batch: Batch | None = None
    model.train()
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, offset * cfg.batch_size)
            ran = False
            for raw in loader:
                fitted = budget.fit(step, total)
                if fitted is not None and fitted != total:
                    total = fitted
                    schedule = task.schedule(lr, total, steps_per_epoch)
                    bar.total = total
                    run.save_config(cfg.to_dict(), derived())
                if step >= total:
                    stopped_by = "time budget" if cfg.time_budget_min else None
                    break
                values, ran = schedule(step), True
                _apply(optimizer, values)
                batch = task.prepare(raw)
                skipped_train += batch.skipped
                weight = 1.0
                if batch.size == 0:  # no image of the batch could be read (each listed in train.log)
                    if not env.distributed or last_batch is None:
                        step += 1
                        bar.update(1)
                        continue
                    batch, weight = last_batch, 0.0  # keep the processes in step; this batch adds no gradient
                last_batch = batch
                with autocast_context(env.device, task.amp_dtype):
                    loss, parts = task.loss(net, batch, values)
                current = step
                value = step_fn(loss.float(), weight=weight, parts=parts,
                                before_update=lambda: task.before_update(current))
                extra = task.after_step(step, values)
                step += 1
                bar.update(1)
                meter.add(value, parts, batch.size * env.world_size if weight else 0)
                if step % cfg.log_every == 0 or step == total:
                    record = meter.flush()
                    run.write("step", step, epoch=step / steps_per_epoch, **record, **values, **extra)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    if bar.disable and cfg.progress:
                        log.info("step %d/%d (epoch %.2f)  loss %.4f  lr %.2e  %.1f img/s  elapsed %s  ETA %s", step,
                                 total, step / steps_per_epoch, record["loss"], values["lr"], record["img_per_s"],
                                 format_duration(run.elapsed()), format_duration(budget.eta(step, total)))
                if eval_every and step % eval_every == 0 and step < total:
                    evaluate(final=False)
                elif ckpt_every and step % ckpt_every == 0 and step < total:
                    save_last()
                if step % steps_per_epoch == 0 or step >= total:
                    break
            if ran and step % steps_per_epoch == 0:
                record = meter.end_epoch()
                skipped_epoch = int(dist_utils.all_reduce_sum(torch.tensor([skipped_train - skipped_before]), env)[0])
                skipped_before = skipped_train
                run.write("epoch", step, epoch=step // steps_per_epoch - 1, lr=values["lr"],
                          skipped_images=skipped_epoch, elapsed=round(run.elapsed(), 1), **record)
                log.info("epoch %d/%.4g  train loss %.4f  lr %.2e  (%s, %.0f img/s, elapsed %s, ETA %s)%s",
                         step // steps_per_epoch, total / steps_per_epoch, record["train_loss"], values["lr"],
                         format_duration(record["epoch_time"]), record["epoch_img_per_s"],
                         format_duration(run.elapsed()), format_duration(budget.eta(step, total)),
                         f"  skipped {skipped_epoch} unreadable image(s) (listed in train.log)"
                         if skipped_epoch else "")
            if stopped_by:
                break
    except NonFiniteLossError as err:
        bar.close()
        last = run.path / "last.pt"
        where = last if last.exists() else "none yet (no checkpoint was written before it)"
        run.write("stop", step, reason=str(err))
        log.error("%s Last good checkpoint: %s", err, where)
        if cfg.plot:
            run.plot(task.plot)
        run.finish("stopped: non-finite loss", **_result_fields(task, step, steps_per_epoch, meter, None, best,
                                                                skipped_train, env), error=str(err))
        raise NonFiniteLossError(f"{err} Last good checkpoint: {where}") from None
    except KeyboardInterrupt:
        bar.close()
        run.write("stop", step, reason="interrupted")
        run.finish("interrupted", **_result_fields(task, step, steps_per_epoch, meter, None, best, skipped_train),
                   resume=f"--resume {run.path}")
        raise
    bar.close()
    if stopped_by:
        log.info("stopped at step %d by the %s", step, stopped_by)
    skipped_train = int(dist_utils.all_reduce_sum(torch.tensor([skipped_train]), env)[0])
    save_last()
    metrics = evaluate(final=True) or {}
    if env.is_main:
        info = {"task": task.name, "steps": step, "epochs": round(step / steps_per_epoch, 4),
                "wall_time": round(run.elapsed(), 1), "lr": lr, "global_batch": cfg.batch_size * env.world_size}
        run.files["model"] = task.save_model(run.path / task.model_file, metrics or None, info)
    if cfg.plot:
        run.plot(task.plot)
    if skipped_train or metrics.get("skipped"):
        log.warning("skipped unreadable images: %d in training (all epochs), %d of %d in evaluation (listed in %s)",
                    skipped_train, metrics.get("skipped", 0), metrics.get("skipped", 0) + metrics.get("n", 0),
                    run.files["log"])
    dist_utils.barrier(env)
    fields_ = _result_fields(task, step, steps_per_epoch, meter, metrics, best, skipped_train)
    record = run.finish(status, **fields_, stopped_by=stopped_by)
    result = FitResult(task.name, run.path, status, step, fields_["epochs"], record["wall_time"], fields_["train_loss"],
                       metrics, task.primary, best, dict(run.files))
    log.info(result.summary())
    return result


def _result_fields(task: Task, step: int, steps_per_epoch: int, meter: Meter, metrics: dict | None,
                   best: dict | None, skipped_train: int, env: dist_utils.DistEnv | None = None) -> dict[str, Any]:
    """The fields of ``result.json`` every task writes (``status``, ``wall_time`` and ``files`` are the run's); with
    ``env`` the skipped images are summed over processes (every process must call it then)."""
    if env is not None and env.distributed:
        skipped_train = int(dist_utils.all_reduce_sum(torch.tensor([skipped_train]), env)[0])
    return {"task": task.name, "command": task.command, "steps": step, "epochs": round(step / steps_per_epoch, 4),
            "train_loss": meter.last_loss, "primary": task.primary, "metrics": metrics or {}, "best": best,
            "skipped_images": {"train": skipped_train, "val": int((metrics or {}).get("skipped", 0))}}


def _optim_state(step_fn: OptimStep) -> dict[str, Any]:
    state = step_fn.state_dict()
    return {"optimizer": state["optimizer"], "scaler": state["scaler"]}


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


class Meter:
    """Loss (and its named parts) and throughput over the steps since the last log line and the last epoch."""

    def __init__(self, env: dist_utils.DistEnv) -> None:
        self.env = env
        self.last_loss: float | None = None
        self._window: dict[str, list[float]] = {}
        self._epoch: list[float] = []
        self._images = self._epoch_images = 0
        self._t = self._t_epoch = time.time()

    def add(self, loss: float, parts: dict[str, torch.Tensor], images: int) -> None:
        self.last_loss = loss
        named = {k if k.startswith("loss_") else f"loss_{k}": float(v.detach()) for k, v in parts.items()}
        for key, value in {"loss": loss, **named}.items():
            self._window.setdefault(key, []).append(value)
        self._epoch.append(loss)
        self._images += images
        self._epoch_images += images

    def flush(self) -> dict[str, float]:
        """Means since the last call, and images per second."""
        now = time.time()
        record = {k: sum(v) / len(v) for k, v in self._window.items()}
        record.setdefault("loss", float("nan"))
        record["img_per_s"] = self._images / max(now - self._t, 1e-9)
        self._window, self._images, self._t = {}, 0, now
        return record

    def end_epoch(self) -> dict[str, float]:
        now = time.time()
        record = {"train_loss": sum(self._epoch) / max(len(self._epoch), 1), "epoch_time": now - self._t_epoch,
                  "epoch_img_per_s": self._epoch_images / max(now - self._t_epoch, 1e-9)}
        self._epoch, self._epoch_images, self._t_epoch = [], 0, now
        return record


class TimeBudget:
    """``--time-budget-min``: the speed is measured over steps 3..15, then again every 12 steps (which follows a
    machine that speeds up or slows down), and the run's total steps are fitted to the time left."""

    FIRST, LAST = 3, 15

    def __init__(self, minutes: float | None, run: Run, step: int, max_steps: int) -> None:
        self.seconds = minutes * 60 if minutes else None
        self.run, self.max_steps = run, max_steps
        self.mark: tuple[int, float | None] = (step, None)
        self.per_step: float | None = None
        self._t0, self._s0 = time.time(), step

    def fit(self, step: int, total: int) -> int | None:
        """A new total step count when it is time to refit (``step`` itself when the budget is used up), else None."""
        if not self.seconds or step < self.FIRST or (self.mark[1] is not None and step - self.mark[0] < self.LAST -
                                                     self.FIRST):
            return None
        previous, self.mark = self.mark, (step, time.time())
        if previous[1] is None:
            return None
        self.per_step = (time.time() - previous[1]) / (step - previous[0])
        env = self.run.env
        if dist_utils.broadcast_object(self.run.elapsed() + self.per_step >= self.seconds, env):
            log.warning("time budget of %.1f min used up at step %d of %d: stopping here", self.seconds / 60, step,
                        total)
            return step
        fit = dist_utils.broadcast_object(step + int((0.98 * self.seconds - self.run.elapsed()) / self.per_step), env)
        new_total = max(step + 1, min(fit, self.max_steps))
        if abs(new_total - total) > 0.05 * total:
            log.info("time budget %.1f min: %.3f s/step, so %d steps in all", self.seconds / 60, self.per_step,
                     new_total)
        return new_total

    def eta(self, step: int, total: int) -> float:
        """Seconds left by the speed so far."""
        per_step = self.per_step or (time.time() - self._t0) / max(step - self._s0, 1)
        return max(total - step, 0) * per_step
