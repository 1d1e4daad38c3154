"""The training loop (:func:`train`) and evaluation (:func:`evaluate`, :func:`evaluate_model`).

One code path serves one CPU process and ``torchrun`` launches over many GPUs: the model is
wrapped in DistributedDataParallel when there is more than one process, batches are dealt out by
:class:`~xcit.data.RepeatAugSampler`, metrics are summed over ranks, and only rank 0 writes.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataError, ImageFolderDataset, TensorImageDataset, build_dataset, dataset_kind
from ..data.loader import RepeatAugSampler, ShardSampler, build_loader
from ..data.transforms import BatchEvalTransform, BatchTrainTransform, folder_eval_transform, folder_train_transform
from ..models.weights import CheckpointError, save_checkpoint
from . import distributed as dist_utils
from .checkpoint import load_state, rng_state, set_rng_state
from .config import RUNTIME_OPTIONS, TrainConfig, rename_options, resolve_config, validate
from .losses import DistillationLoss, LabelCrossEntropy, SoftTargetCrossEntropy
from .metrics import format_duration, progress_bar
from .model_setup import build_model, build_teacher, drop_path_rate
from .optim import build_optimizer, build_scheduler
from .plots import plot_run
from .run import (
    NonFiniteLossError,
    OptimStep,
    Run,
    autocast_context,
    default_run_name,
    launch,
    resume_target,
    resolve_amp,
    seed_everything,
    set_threads,
)

log = logging.getLogger("xcit.train")


@dataclass
class RunResult:
    """What a finished run produced and where."""

    run_dir: Path
    model_path: Path | None
    metrics: dict[str, Any]
    best_top1: float
    epochs: int
    steps: int
    wall_time: float
    status: str = "completed"
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        lines = [(f"run: {self.run_dir}  ({self.status}, {self.epochs} epochs, {self.steps} steps, "
                  f"{format_duration(self.wall_time)})")]
        if "top1" in m:
            lines.append(f"{m.get('split', 'eval')} top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}"
                         f"  ({m['n']} images, {m.get('weights', 'model')} weights)")
        for key, label in (("model", "model"), ("last", "checkpoint"), ("best", "best"), ("log", "log"),
                           ("metrics", "metrics"), ("plot", "plot"), ("config", "config")):
            if key in self.files:
                lines.append(f"  {label:<10} {self.files[key]}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- setup


@dataclass
class DataSetup:
    train_set: TensorImageDataset | ImageFolderDataset
    val_set: TensorImageDataset | ImageFolderDataset
    classes: list[str]
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def info(self, cfg: TrainConfig) -> dict:
        """The ``data`` entry of model.pth: what prediction needs to preprocess images the same way."""
        return {"img_size": self.img_size, "in_chans": self.in_chans, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation, "dataset": str(cfg.data)}


def build_data(cfg: TrainConfig) -> DataSetup:
    """Both splits, checked, with the resolution, channels and normalisation the run will use."""
    train_set = build_dataset(cfg.data, cfg.train_split, in_chans=cfg.in_chans)
    val_set = build_dataset(cfg.data, cfg.val_split, in_chans=cfg.in_chans, classes=train_set.classes)
    in_chans = cfg.in_chans or train_set.in_chans
    if isinstance(train_set, TensorImageDataset) and in_chans != train_set.in_chans:
        raise DataError(f"{cfg.data} has {train_set.in_chans}-channel images, in_chans {in_chans} was asked for "
                        "(--finetune converts a checkpoint's stem to the data's channels by itself)")
    img_size = cfg.img_size or (train_set.native_size if isinstance(train_set, TensorImageDataset) else 224)
    mean = tuple(cfg.mean) if cfg.mean else tuple(train_set.mean)
    std = tuple(cfg.std) if cfg.std else tuple(train_set.std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} values (one per channel), got {list(mean)} / {list(std)}")
    if len(val_set.classes) != len(train_set.classes):
        raise DataError(f"{cfg.val_split} has {len(val_set.classes)} classes, {cfg.train_split} {len(train_set.classes)}")
    return DataSetup(train_set, val_set, list(train_set.classes), img_size, in_chans, mean, std)


def build_loaders(cfg: TrainConfig, data: DataSetup, env: dist_utils.DistEnv):
    """(train loader, its sampler, eval loader) for this process."""
    aug = dict(crop=cfg.train_crop, crop_scale_min=cfg.crop_scale_min, hflip=cfg.hflip,
               auto_augment=cfg.auto_augment, reprob=cfg.reprob, interpolation=cfg.interpolation)
    if isinstance(data.train_set, TensorImageDataset):
        train_tf = BatchTrainTransform(data.img_size, mean=data.mean, std=data.std, padding=cfg.crop_padding, **aug)
        eval_tf = BatchEvalTransform(data.img_size, crop_pct=cfg.crop_pct, mean=data.mean, std=data.std,
                                     interpolation=cfg.interpolation)
    else:
        data.train_set.transform = folder_train_transform(data.img_size, mean=data.mean, std=data.std, **aug)
        data.val_set.transform = folder_eval_transform(data.img_size, crop_pct=cfg.crop_pct, mean=data.mean, std=data.std)
        train_tf = eval_tf = None
    sampler = RepeatAugSampler(len(data.train_set), num_replicas=env.world_size, rank=env.rank,
                               repeats=cfg.repeated_aug, seed=cfg.seed)
    if len(sampler) < cfg.batch_size:
        raise DataError(
            f"batch size {cfg.batch_size} per process is larger than the {len(sampler)} training images each of the "
            f"{env.world_size} process(es) gets from {len(data.train_set)}; lower --batch-size"
        )
    pin = env.device.type == "cuda"
    train_loader = build_loader(data.train_set, sampler, cfg.batch_size, batch_transform=train_tf,
                                workers=cfg.workers, drop_last=True, pin_memory=pin)
    eval_loader = build_loader(data.val_set, ShardSampler(len(data.val_set), num_replicas=env.world_size, rank=env.rank),
                               cfg.eval_batch_size or 2 * cfg.batch_size, batch_transform=eval_tf,
                               workers=cfg.workers, pin_memory=pin)
    return train_loader, sampler, eval_loader


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    env: dist_utils.DistEnv | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1, top-5 (%) and mean cross-entropy of ``model`` over ``loader``, summed over all processes."""
    env = env or dist_utils.DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top-1, top-5, images, skipped
    bar = progress_bar(len(loader), desc, progress and env.is_main)
    for images, targets, skipped in loader:
        totals[4] += len(skipped)
        bar.update(1)
        if len(images) == 0:
            continue
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with autocast_context(env.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        totals[0] += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals[1] += hits[:, 0].sum().item()
        totals[2] += hits.any(dim=1).sum().item()
        totals[3] += len(targets)
    bar.close()
    model.train(was_training)
    totals = dist_utils.all_reduce_sum(totals, env)
    n = int(totals[3])
    if n == 0:
        raise DataError("no evaluation image could be read")
    return {"top1": 100.0 * float(totals[1]) / n, "top5": 100.0 * float(totals[2]) / n,
            "loss": float(totals[0]) / n, "n": n, "skipped": int(totals[4])}


# -------------------------------------------------------------------------------------- training


def train(config: TrainConfig | dict | None = None, **options: Any) -> RunResult:
    """Train an XCiT as ``config`` says (a :class:`TrainConfig`, or option values resolved by presets).

    ``train()`` alone trains the Fashion-MNIST preset; ``train(data="digits", epochs=2)`` etc.
    Launched under ``torchrun`` it runs data-parallel. Raises ``ValueError``/``DataError``/
    ``CheckpointError`` for bad options or data before any training, and
    :class:`NonFiniteLossError` if the loss diverges (the last good checkpoint is kept).
    """
    return launch(_train, config, options, TrainConfig, resolve_config, validate)


def _resume_config(cfg: TrainConfig, state: dict) -> TrainConfig:
    saved = rename_options({k: v for k, v in state["config"].items() if k != "_derived"}, TrainConfig.__dataclass_fields__)
    ignored = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_OPTIONS and k in saved and saved[k] != v]
    merged = {**saved, **{k: getattr(cfg, k) for k in RUNTIME_OPTIONS}, "overwrite": False}
    resumed = TrainConfig(**{k: v for k, v in merged.items() if k in TrainConfig.__dataclass_fields__})
    validate(resumed)
    if ignored:
        log.warning("resuming with the run's saved configuration; ignored new value(s) for: %s", ", ".join(ignored))
    return resumed


def _train(cfg: TrainConfig, env: dist_utils.DistEnv) -> RunResult:
    state = load_state(resume_target(cfg.resume, cfg.output)) if cfg.resume else None
    if state is not None:
        cfg = _resume_config(cfg, state)
    thread_note = set_threads(cfg.threads, env)
    # Everything that can be wrong with the data, model or checkpoints is found before the run
    # folder is touched: data and loaders (sizes), the model (fine-tuning weights), the teacher.
    data = build_data(cfg)
    train_loader, sampler, eval_loader = build_loaders(cfg, data, env)
    steps_per_epoch = len(train_loader)
    global_batch = cfg.batch_size * env.world_size
    amp_dtype = resolve_amp(cfg.amp, env.device)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")
    seed_everything(cfg.seed)  # the same initial weights on every rank
    # A resumed run takes its weights from the state file, not again from --finetune.
    model, finetune_note = build_model(replace(cfg, finetune=None) if state else cfg, len(data.classes), data.in_chans)
    teacher = build_teacher(cfg, len(data.classes), data.in_chans, env.device) if cfg.teacher else None
    run = Run.open(cfg, env, default_run_name(cfg.data, cfg.model), resuming=state is not None,
                   output=Path(state["path"]).parent if state is not None and not cfg.output else None)
    for note in (thread_note, finetune_note):
        if note:
            log.info(note)
    task = Classification(cfg, data, model.to(env.device), teacher, env, amp_dtype, steps_per_epoch)
    step = OptimStep(task.optimizer, task.bare.parameters(), env, amp_dtype, clip_grad=cfg.clip_grad,
                     hint="Try a lower --lr, --clip-grad 1.0, a longer --warmup-epochs or --amp none.")
    start_epoch, skip, best = 0, 0, {"top1": -1.0, "epoch": -1, "weights": "model"}
    if state is not None:
        task.load_state_dict(state, step)
        start_epoch, skip, best = state["epoch"], state["epoch_step"], dict(state.get("best", best))
        log.info("resuming %s from epoch %d step %d", state["path"], start_epoch, state["step"])
    seed_everything(cfg.seed + env.rank)  # augmentation randomness differs between ranks
    if state is not None:
        set_rng_state(state["rng"])
    run.save_config(cfg.to_dict(), task.derived(global_batch))
    task.describe(run.path, global_batch)

    def full_state(epoch: int, epoch_step: int) -> Callable[[], dict]:
        return lambda: {**task.state_dict(step), "epoch": epoch, "epoch_step": epoch_step, "step": step.steps,
                        "best": dict(best), "config": cfg.to_dict(), "rng": rng_state()}

    last_metrics: dict[str, Any] = {}
    skipped = {"train": 0, "val": 0}
    epochs_done = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch, start=skip * cfg.batch_size)
            record = task.train_epoch(train_loader, step, run, epoch, skip,
                                      lambda epoch_step: run.save("last.pt", full_state(epoch, epoch_step)))
            skip = 0
            skipped["train"] += record["skipped_images"]
            improved = False
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                # The reported weights were chosen before training (--eval-weights), never by these numbers.
                last_metrics = task.evaluate(eval_loader, record)
                skipped["val"] = last_metrics["skipped"]
                improved = last_metrics["top1"] > best["top1"]
                if improved:
                    best = {"top1": last_metrics["top1"], "epoch": epoch, "weights": last_metrics["weights"]}
            epochs_done = epoch + 1
            run.write("epoch", step.steps, **record)
            log.info(task.epoch_line(record, run.elapsed(), start_epoch))
            run.save("last.pt", full_state(epoch + 1, 0))
            if improved:
                run.copy("last.pt", "best.pt")
            dist_utils.barrier(env)
    except NonFiniteLossError as err:
        last = run.path / "last.pt"
        where = last if last.exists() else "none yet (no epoch finished)"
        run.write("stop", step.steps, reason=str(err))
        log.error("%s Last good checkpoint: %s", err, where)
        if cfg.plot:
            run.plot(plot_run)
        run.finish("stopped: non-finite loss", error=str(err), epochs=epochs_done, steps=step.steps)
        raise NonFiniteLossError(f"{err} Last good checkpoint: {where}") from None

    weights = "ema" if (task.ema is not None and cfg.eval_weights == "ema") else "model"
    final = task.ema.module if weights == "ema" else task.bare
    if amp_dtype is not None or not last_metrics:
        # The reported numbers are those of the saved weights in fp32, what `xcit eval` and
        # `xcit predict` compute (the per-epoch evaluations ran in the training precision).
        last_metrics = {**evaluate_model(final, eval_loader, env, progress=cfg.progress), "weights": weights,
                        "precision": "fp32"}
        log.info("final evaluation of the %s weights in fp32: %s top-1 %.2f%%  top-5 %.2f%%  loss %.4f", weights,
                 cfg.val_split, last_metrics["top1"], last_metrics["top5"], last_metrics["loss"])
    metrics = {**last_metrics, "split": cfg.val_split}
    model_path = None
    if env.is_main:
        extra = {"classes": list(data.classes), "data": data.info(cfg), "metrics": metrics,
                 "weights": last_metrics.get("weights", "model"),
                 "train": {"epochs": epochs_done, "steps": step.steps, "wall_time": round(run.elapsed(), 1),
                           "model": cfg.model, "preset": cfg.preset, "lr": task.lr, "global_batch": global_batch}}
        model_path = save_checkpoint(final, run.path / "model.pth", extra=extra)
        run.files["model"] = model_path
    if cfg.plot:
        run.plot(plot_run)
    if skipped["train"] or skipped["val"]:
        log.warning("skipped unreadable images: %d in training (all epochs), %d of %d in %s (listed in %s)",
                    skipped["train"], skipped["val"], skipped["val"] + metrics["n"], cfg.val_split, run.files["log"])
    dist_utils.barrier(env)
    record = run.finish("completed", metrics=metrics, best_top1=best["top1"], best_epoch=best["epoch"] + 1,
                        epochs=epochs_done, steps=step.steps, skipped_images=skipped)
    result = RunResult(run.path, model_path, metrics, best["top1"], epochs_done, step.steps, record["wall_time"],
                       "completed", dict(run.files))
    log.info(result.summary())
    return result


class Classification:
    """What is classification's own in a training run: optimiser and schedule, EMA, mixup, losses, epochs."""

    def __init__(self, cfg: TrainConfig, data: DataSetup, model: nn.Module, teacher: nn.Module | None,
                 env: dist_utils.DistEnv, amp_dtype: torch.dtype | None, steps_per_epoch: int) -> None:
        self.cfg, self.data, self.env, self.amp_dtype, self.steps_per_epoch = cfg, data, env, amp_dtype, steps_per_epoch
        if env.distributed and cfg.sync_bn:
            model = dist_utils.convert_batchnorm(model, env.device)
        self.bare = model
        self.lr = cfg.lr * cfg.batch_size * env.world_size / 512 if cfg.lr_scaling else cfg.lr
        self.optimizer = build_optimizer(model, self.lr, cfg.weight_decay, eps=cfg.opt_eps,
                                         exempt_per_channel=cfg.wd_exempt_per_channel, layer_decay=cfg.layer_decay)
        self.scheduler = build_scheduler(self.optimizer, self.lr, steps_per_epoch * cfg.epochs,
                                         round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_lr, cfg.min_lr,
                                         cfg.sched, steps_per_epoch=steps_per_epoch if cfg.sched_step == "epoch" else None)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.mixup = None
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=len(data.classes))
        base = SoftTargetCrossEntropy() if self.mixup is not None else LabelCrossEntropy(cfg.smoothing)
        self.loss = (DistillationLoss(base, teacher, cfg.distillation, cfg.distill_alpha, cfg.distill_tau)
                     if teacher is not None and cfg.distillation != "none" else (lambda images, logits, y: base(logits, y)))
        self.model = model
        if env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def state_dict(self, step: OptimStep) -> dict:
        return {"model": self.bare.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": step.scaler.state_dict() if step.scaler is not None else None,
                "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict, step: OptimStep) -> None:
        try:
            self.bare.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            if step.scaler is not None and state.get("scaler") is not None:
                step.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{state['path']} does not fit this run's model/optimizer: {err}") from err
        step.steps = int(state["step"])

    def derived(self, global_batch: int) -> dict:
        cfg, data = self.cfg, self.data
        return {"lr": self.lr, "global_batch": global_batch, "world_size": self.env.world_size,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.steps_per_epoch * cfg.epochs,
                "drop_path": drop_path_rate(cfg), "img_size": data.img_size, "in_chans": data.in_chans,
                "num_classes": len(data.classes), "device": str(self.env.device),
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
                "params": sum(p.numel() for p in self.bare.parameters()), "torch_threads": torch.get_num_threads()}

    def describe(self, run_dir: Path, global_batch: int) -> None:
        cfg, data, info = self.cfg, self.data, self.derived(global_batch)
        log.info("data %s: %d train / %d %s images, %d classes, %dx%d, %d channel(s)", cfg.data, len(data.train_set),
                 len(data.val_set), cfg.val_split, len(data.classes), data.img_size, data.img_size, data.in_chans)
        log.info("model %s (%s): %.2fM parameters, drop path %.2f; %s on %s x%d, amp %s, %d thread(s)", cfg.model,
                 ", ".join(f"{k}={v}" for k, v in self.bare.arch_config.items()
                           if k in ("patch_size", "embed_dim", "depth", "num_heads")),
                 info["params"] / 1e6, info["drop_path"], "DDP" if self.env.distributed else "single process",
                 self.env.device, self.env.world_size, info["amp"], torch.get_num_threads())
        log.info("%d epochs x %d steps, global batch %d (--batch-size %d per process), lr %.3g (warmup %.1f epochs, "
                 "%s), weight decay %g -> %s", cfg.epochs, self.steps_per_epoch, global_batch, cfg.batch_size, self.lr,
                 cfg.warmup_epochs, cfg.sched, cfg.weight_decay, run_dir)

    def train_epoch(self, loader, step: OptimStep, run: Run, epoch: int, skip: int,
                    checkpoint: Callable[[int], Any]) -> dict[str, Any]:
        """One epoch (from step ``skip`` of it, when resumed); returns its record for metrics.jsonl."""
        cfg, env = self.cfg, self.env
        self.model.train()
        t_epoch, sums = time.time(), torch.zeros(3, dtype=torch.float64)  # loss sum, steps, skipped images
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and env.is_main)
        bar.update(skip)
        t_log, seen, epoch_step, last_batch, lr = time.time(), 0, skip, None, self.optimizer.param_groups[0]["lr"]
        for images, targets, skipped in loader:
            sums[2] += len(skipped)
            if len(images) == 0:
                if not env.distributed or last_batch is None:
                    continue
                images, targets = last_batch  # keep the ranks in step; this batch adds no gradient
                weight = 0.0
            else:
                weight, last_batch = 1.0, (images, targets)
            images = images.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            if self.mixup is not None:
                if len(images) % 2:
                    images, targets = images[:-1], targets[:-1]
                images, targets = self.mixup(images, targets)
            with autocast_context(env.device, self.amp_dtype):
                logits = self.model(images)
            loss_value = step(self.loss(images, logits.float(), targets), weight=weight)
            self.scheduler.step()
            epoch_step += 1
            if self.ema is not None:
                self.ema.update(self.bare, step=step.steps)
            sums[0] += loss_value
            sums[1] += 1
            seen += len(images) * env.world_size
            lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
            bar.update(1)
            if step.steps % cfg.log_every == 0 or epoch_step == self.steps_per_epoch:
                speed = seen / max(time.time() - t_log, 1e-9)
                t_log, seen = time.time(), 0
                run.write("step", step.steps, epoch=epoch, loss=loss_value, lr=lr, img_per_s=speed)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
                if bar.disable and cfg.progress and epoch_step < self.steps_per_epoch:
                    log.info("epoch %d/%d [%d/%d]  loss %.4f  lr %.2e  %.0f img/s  elapsed %s", epoch + 1, cfg.epochs,
                             epoch_step, self.steps_per_epoch, loss_value, lr, speed, format_duration(run.elapsed()))
            if cfg.ckpt_every and step.steps % cfg.ckpt_every == 0 and epoch_step < self.steps_per_epoch:
                checkpoint(epoch_step)
        bar.close()
        sums = dist_utils.all_reduce_sum(sums, env)
        if int(sums[2]):
            log.warning("epoch %d: skipped %d unreadable image(s) of the training set (listed in train.log)", epoch + 1, int(sums[2]))
        return {"epoch": epoch, "train_loss": float(sums[0] / max(float(sums[1]), 1.0)), "lr": lr,
                "epoch_time": time.time() - t_epoch, "skipped_images": int(sums[2])}

    def evaluate(self, loader, record: dict) -> dict[str, Any]:
        """Evaluate the weights (and the EMA); adds ``val_*`` / ``ema_*`` to ``record``; returns the reported ones."""
        # The bare module: DDP's forward would broadcast buffers, and shards differ in length.
        metrics = {**evaluate_model(self.bare, loader, self.env, amp_dtype=self.amp_dtype, progress=self.cfg.progress),
                   "weights": "model"}
        record.update({f"val_{k}": v for k, v in metrics.items() if k not in ("weights", "skipped")},
                      val_skipped_images=metrics["skipped"])
        if self.ema is not None:
            ema = evaluate_model(self.ema.module, loader, self.env, amp_dtype=self.amp_dtype, progress=self.cfg.progress)
            record.update({f"ema_{k}": v for k, v in ema.items() if k not in ("skipped", "n")})
            if self.cfg.eval_weights == "ema":
                metrics = {**ema, "weights": "ema"}
        return metrics

    def epoch_line(self, record: dict, elapsed: float, start_epoch: int) -> str:
        cfg, epoch = self.cfg, record["epoch"]
        done = epoch + 1 - start_epoch
        msg = f"epoch {epoch + 1}/{cfg.epochs}  train loss {record['train_loss']:.4f}  lr {record['lr']:.2e}"
        if "val_top1" in record:
            msg += f"  {cfg.val_split} top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%"
            if record["val_skipped_images"]:
                msg += f" ({record['val_n']} images; {record['val_skipped_images']} unreadable, skipped)"
        if "ema_top1" in record:
            msg += f"  EMA top-1 {record['ema_top1']:.2f}%"
        rate = self.steps_per_epoch * self.cfg.batch_size * self.env.world_size / max(record["epoch_time"], 1e-9)
        return (msg + f"  ({format_duration(record['epoch_time'])}, {rate:.0f} img/s, elapsed {format_duration(elapsed)},"
                f" ETA {format_duration(elapsed / max(done, 1) * (cfg.epochs - epoch - 1))})")


# ------------------------------------------------------------------------------ public evaluate


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The plain entries saved beside the weights of a model file (``classes``, ``data``, ``metrics``...)."""
    from ..models.weights import read_metadata

    return read_metadata(path)


def evaluate(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    split: str = "val",
    *,
    model_name: str | None = None,
    batch_size: int = 256,
    img_size: int | None = None,
    crop_pct: float | None = None,
    in_chans: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    workers: int = 4,
    amp: str = "none",
    progress: bool = True,
    int8: bool = False,
    calibration_images: int = 512,
    calibration_split: str = "train",
) -> dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint on a dataset, with the official evaluation preprocessing.

    With ``int8`` the model is first quantised (:func:`xcit.quantize`, CPU, one process) on
    ``calibration_images`` images drawn from ``calibration_split`` of the same data.

    ``data`` defaults to the dataset the checkpoint records it was trained on (``xcit train``,
    ``xcit dino`` and the linear probe write it); a checkpoint that records none needs it given.
    Preprocessing defaults come from the checkpoint's saved ``data`` entry, else the ImageNet ones
    (crop ratio 1.0, bicubic). Runs data-parallel under torchrun.
    """
    from ..models import create_model, resolve_name

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int8 and (amp != "none" or device not in ("auto", "cpu") or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ValueError("int8 evaluation runs in one CPU process in float32 around the int8 kernels: "
                         "use --device cpu (or auto), --amp none and no torchrun")
    meta = read_model_metadata(checkpoint)
    saved = meta.get("data", {}) if isinstance(meta.get("data"), dict) else {}
    if data is None:
        data = saved.get("dataset")
        if not data:
            raise ValueError(f"expected --data (the images to evaluate on): {os.fspath(checkpoint)} does not record "
                             "the dataset it was trained on")
    kind = dataset_kind(data)
    default_size = resolve_name(model_name).img_size if model_name else 224
    chans = in_chans or saved.get("in_chans") or (1 if kind in ("fashion-mnist", "digits", "idx") else 3)
    classes = meta.get("classes")
    try:
        dataset = build_dataset(data, split, in_chans=chans, classes=classes if kind == "folder" else None)
    except DataError:
        if kind != "folder" or not classes:
            raise
        dataset = build_dataset(data, split, in_chans=chans)
        if len(dataset.classes) != len(classes):
            raise
        log.warning("class folders differ from the checkpoint's class names; assuming the same (sorted) order")
    if isinstance(dataset, TensorImageDataset) and dataset.in_chans != chans:
        raise DataError(f"{data} has {dataset.in_chans}-channel images, the model takes {chans}")
    size = img_size or saved.get("img_size") or (dataset.native_size if isinstance(dataset, TensorImageDataset) else default_size)
    pct = crop_pct if crop_pct is not None else saved.get("crop_pct", 1.0)
    norm_mean = tuple(mean or saved.get("mean") or dataset.mean)
    norm_std = tuple(std or saved.get("std") or dataset.std)
    interp = interpolation or saved.get("interpolation", "bicubic")
    env = dist_utils.setup("cpu" if int8 else device)
    try:
        model = create_model(model_name, checkpoint=checkpoint, in_chans=chans).to(env.device)
        n_out = model.num_classes
        if classes and isinstance(dataset, TensorImageDataset) and list(classes) != list(dataset.classes):
            if len(classes) != len(dataset.classes):
                raise DataError(f"the model predicts {len(classes)} classes, {data} has {len(dataset.classes)}")
            log.warning("the checkpoint's class names differ from %s's; comparing labels by index", data)
        if n_out < len(dataset.classes):
            raise DataError(f"the model predicts {n_out} classes, {data} has {len(dataset.classes)}")
        if isinstance(dataset, TensorImageDataset):
            tf = BatchEvalTransform(size, crop_pct=pct, mean=norm_mean, std=norm_std, interpolation=interp)
        else:
            dataset.transform = folder_eval_transform(size, crop_pct=pct, mean=norm_mean, std=norm_std)
            tf = None
        if int8:
            model = _quantized(model, data, calibration_images, calibration_split, batch_size, chans, size, pct, norm_mean,
                               norm_std, interp)
        loader = build_loader(dataset, ShardSampler(len(dataset), num_replicas=env.world_size, rank=env.rank),
                              batch_size, batch_transform=tf, workers=workers, pin_memory=env.device.type == "cuda")
        metrics = evaluate_model(model, loader, env, amp_dtype=resolve_amp(amp, env.device), progress=progress,
                                 desc=f"eval {split}")
    finally:
        dist_utils.cleanup(env)
    extra = {"int8": {"calibration_images": model.calibration_images, "calibration_split": calibration_split}} if int8 else {}
    return {**metrics, "img_size": size, "crop_pct": pct, "data": str(data), "split": split,
            "checkpoint": str(checkpoint), **extra}


def _quantized(model: nn.Module, data, n: int, split: str, batch_size: int, in_chans: int, size: int, pct: float,
               mean: tuple, std: tuple, interpolation: str) -> nn.Module:
    """``model`` quantised to int8 on ``n`` images of ``data``'s ``split`` (evaluation preprocessing)."""
    from ..data.calibration import calibration_images
    from ..models import quantize

    images = calibration_images(
        data, n, in_chans=in_chans, split=split,
        batch_transform=BatchEvalTransform(size, crop_pct=pct, mean=mean, std=std, interpolation=interpolation),
        image_transform=folder_eval_transform(size, crop_pct=pct, mean=mean, std=std),
    )
    log.info("int8: calibrating on %d images of %s (%s), %dpx", len(images), data, split, size)
    return quantize(model.eval(), images, batch_size=batch_size)
