"""The training loop (:func:`train`) and evaluation (:func:`evaluate`, :func:`evaluate_model`).

One code path serves one CPU process and ``torchrun`` launches over many GPUs: the model is
wrapped in DistributedDataParallel when there is more than one process, batches are dealt out by
:class:`~xcit.data.RepeatAugSampler`, metrics are summed over ranks, and only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataError, ImageFolderDataset, TensorImageDataset, build_dataset, dataset_kind
from ..data.loader import RepeatAugSampler, ShardSampler, build_loader
from ..data.transforms import BatchEvalTransform, BatchTrainTransform, folder_eval_transform, folder_train_transform
from ..models.weights import CheckpointError, save_checkpoint
from . import distributed as dist_utils
from .checkpoint import load_state, rng_state, save_state, set_rng_state
from .config import AMP_MODES, TrainConfig, resolve_config, save_config, validate
from .losses import DistillationLoss, LabelCrossEntropy, SoftTargetCrossEntropy
from .metrics import MetricsWriter, close_logging, format_duration, progress_bar, setup_logging
from .model_setup import build_model, build_teacher, drop_path_rate
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("xcit.train")

# Options that may change when a run is resumed; all others come from the saved configuration.
RUNTIME_OPTIONS = ("resume", "output", "workers", "threads", "progress", "tensorboard", "plot", "log_every",
                   "eval_every", "ckpt_every", "device", "dist_backend", "eval_batch_size")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


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


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` mode (auto, bf16, fp16, none) on ``device``; None means fp32."""
    if mode not in AMP_MODES:
        raise ValueError(f"expected amp in {AMP_MODES}, got {mode!r}")
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if mode == "none":
        return None
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("amp fp16 needs a CUDA device (it uses a gradient scaler); on CPU use --amp bf16 or none")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --amp fp16")
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def set_threads(cfg: TrainConfig, env: dist_utils.DistEnv) -> str:
    """Set torch's CPU threads: ``cfg.threads``, else this process's share of the cores.

    On a machine already busy with other work (load average >= cores), OpenMP threads that
    spin-wait for each other slow training down many times over; unless OMP_WAIT_POLICY=PASSIVE
    is set, one thread per process is used then. Returns a note for the log.
    """
    if env.device.type != "cpu" and cfg.threads is None:
        return ""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
        return ""
    cores = os.cpu_count() or 1
    threads = max(1, cores // env.local_world_size)
    note = ""
    if threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load >= cores:
            note = (f"this machine is busy (load {load:.1f} on {cores} cores): using 1 thread per process instead of "
                    f"{threads}, as spinning OpenMP threads would slow down; set OMP_WAIT_POLICY=PASSIVE or --threads")
            threads = 1
    torch.set_num_threads(threads)
    return note


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: TrainConfig, env: dist_utils.DistEnv, resume_path: Path | None) -> Path:
    """The run directory (``cfg.output``, the resumed run's, or ``runs/<data>-<model>-<time>``), made on rank 0;
    refuses to overwrite a run that is not being resumed. ``cfg`` needs ``output``, ``data`` (and ``model``)."""
    if cfg.output:
        path = Path(cfg.output)
    elif resume_path is not None:
        path = resume_path.parent
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        data = Path(cfg.data).name if os.sep in cfg.data else cfg.data
        path = Path("runs") / f"{data}-{cfg.model}-{stamp}"
    path = Path(dist_utils.broadcast_object(str(path), env))
    if resume_path is None and (path / "last.pt").exists():
        raise ValueError(f"{path} already holds a run (last.pt); continue it with --resume, or choose another --output")
    if env.is_main:
        path.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier(env)
    return path


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
    if isinstance(config, TrainConfig):
        cfg = resolve_config({**config.to_dict(), **options}) if options else config
        validate(cfg)
    else:
        cfg = resolve_config(config or {}, **options)
    env = dist_utils.setup(cfg.device, cfg.dist_backend)
    try:
        return _train(cfg, env)
    finally:
        close_logging()
        dist_utils.cleanup(env)


def _resume_config(cfg: TrainConfig, state: dict) -> TrainConfig:
    saved = dict(state["config"])
    saved.pop("_derived", None)
    ignored = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_OPTIONS and k in saved and saved[k] != v]
    merged = {**saved, **{k: getattr(cfg, k) for k in RUNTIME_OPTIONS}}
    resumed = TrainConfig(**{k: v for k, v in merged.items() if k in TrainConfig.__dataclass_fields__})
    validate(resumed)
    if ignored:
        log.warning("resuming with the run's saved configuration; ignored new value(s) for: %s", ", ".join(ignored))
    return resumed


def _train(cfg: TrainConfig, env: dist_utils.DistEnv) -> RunResult:
    t_start = time.time()
    state = None
    resume_path = None
    if cfg.resume:
        target = Path(cfg.output) if cfg.resume == "auto" and cfg.output else Path(cfg.resume)
        if cfg.resume == "auto" and not cfg.output:
            raise ValueError("bare --resume needs --output RUN_DIR (or give --resume RUN_DIR)")
        state = load_state(target)
        resume_path = Path(state["path"])
        cfg = _resume_config(cfg, state)
    thread_note = set_threads(cfg, env)

    # Everything that can be wrong with the data, model or checkpoints is found before the run
    # directory is made: data and loaders (sizes), the model (fine-tuning weights), the teacher.
    data = build_data(cfg)
    train_loader, sampler, eval_loader = build_loaders(cfg, data, env)
    sampler.set_epoch(0)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    global_batch = cfg.batch_size * env.world_size
    amp_dtype = resolve_amp(cfg.amp, env.device)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")
    seed_everything(cfg.seed)  # the same initial weights on every rank
    # A resumed run takes its weights from the state file, not again from --finetune.
    model, finetune_note = build_model(replace(cfg, finetune=None) if state else cfg, len(data.classes), data.in_chans)
    teacher = build_teacher(cfg, len(data.classes), data.in_chans, env.device) if cfg.teacher else None

    run_dir = prepare_run_dir(cfg, env, resume_path)
    setup_logging(run_dir, env.is_main)
    for note in (thread_note, finetune_note):
        if note:
            log.info(note)
    if state is not None:
        log.info("resuming %s from epoch %d step %d", resume_path, state["epoch"], state["step"])

    model.to(env.device)
    if env.distributed and cfg.sync_bn:
        model = dist_utils.convert_batchnorm(model, env.device)
    lr = cfg.lr * global_batch / 512 if cfg.lr_scaling else cfg.lr
    optimizer = build_optimizer(model, lr, cfg.weight_decay, eps=cfg.opt_eps,
                                exempt_per_channel=cfg.wd_exempt_temperature, layer_decay=cfg.layer_decay)
    scheduler = build_scheduler(optimizer, lr, total_steps, round(cfg.warmup_epochs * steps_per_epoch),
                                cfg.warmup_lr, cfg.min_lr, cfg.sched,
                                steps_per_epoch=steps_per_epoch if cfg.sched_step == "epoch" else None)
    scaler = None
    if amp_dtype == torch.float16:  # fp16 (CUDA only) needs loss scaling; bf16 does not
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
    mixup = None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                      num_classes=len(data.classes))
    base_loss = SoftTargetCrossEntropy() if mixup is not None else LabelCrossEntropy(cfg.smoothing)
    criterion = (DistillationLoss(base_loss, teacher, cfg.distillation, cfg.distill_alpha, cfg.distill_tau)
                 if teacher is not None and cfg.distillation != "none" else None)
    bare = model
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(bare, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    start_epoch, start_epoch_step, global_step, best = 0, 0, 0, {"top1": -1.0, "epoch": -1, "weights": "model"}
    if state is not None:
        try:
            bare.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema") is not None:
                ema.module.load_state_dict(state["ema"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{resume_path} does not fit this run's model/optimizer: {err}") from err
        start_epoch, start_epoch_step, global_step = state["epoch"], state["epoch_step"], state["step"]
        best = dict(state.get("best", best))
    seed_everything(cfg.seed + env.rank)  # augmentation randomness differs between ranks
    if state is not None:
        set_rng_state(state["rng"])

    derived = {"lr": lr, "global_batch": global_batch, "world_size": env.world_size, "steps_per_epoch": steps_per_epoch,
               "total_steps": total_steps, "drop_path": drop_path_rate(cfg), "img_size": data.img_size,
               "in_chans": data.in_chans, "num_classes": len(data.classes), "device": str(env.device),
               "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
               "params": sum(p.numel() for p in bare.parameters()), "torch_threads": torch.get_num_threads()}
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml", derived)
    writer = MetricsWriter(run_dir, env.is_main, cfg.tensorboard)
    log.info("data %s: %d train / %d %s images, %d classes, %dx%d, %d channel(s)", cfg.data, len(data.train_set),
             len(data.val_set), cfg.val_split, len(data.classes), data.img_size, data.img_size, data.in_chans)
    log.info("model %s (%s): %.2fM parameters, drop path %.2f; %s on %s x%d, amp %s, %d thread(s)", cfg.model,
             ", ".join(f"{k}={v}" for k, v in bare.arch_config.items() if k in ("patch_size", "embed_dim", "depth", "num_heads")),
             derived["params"] / 1e6, derived["drop_path"], "DDP" if env.distributed else "single process",
             env.device, env.world_size, derived["amp"], torch.get_num_threads())
    log.info("%d epochs x %d steps, global batch %d, lr %.3g (warmup %.1f epochs, %s), weight decay %g -> %s",
             cfg.epochs, steps_per_epoch, global_batch, lr, cfg.warmup_epochs, cfg.sched, cfg.weight_decay, run_dir)

    def full_state(epoch: int, epoch_step: int) -> dict:
        return {
            "model": bare.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "epoch": epoch, "epoch_step": epoch_step, "step": global_step, "best": dict(best),
            "config": cfg.to_dict(), "rng": rng_state(),
        }

    last_metrics: dict[str, Any] = {}
    status = "completed"
    epochs_done = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_epoch_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=skip * cfg.batch_size)
            model.train()
            t_epoch = time.time()
            sums = torch.zeros(3, dtype=torch.float64)  # loss sum, steps, skipped images
            bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and env.is_main)
            bar.update(skip)
            # Without a terminal (batch jobs, log files) a line every tenth of an epoch stands in for the bar.
            quiet_bar = bar.disable and cfg.progress and env.is_main and steps_per_epoch >= 50
            report_every = max(1, steps_per_epoch // 10)
            t_log, seen_since_log, epoch_step, last_batch = time.time(), 0, skip, None
            for images, targets, skipped in train_loader:
                if skipped:
                    sums[2] += len(skipped)
                if len(images) == 0:
                    if not env.distributed or last_batch is None:
                        continue
                    images, targets = last_batch  # keep the ranks in step; this batch adds no gradient
                    weight = 0.0
                else:
                    weight = 1.0
                    last_batch = (images, targets)
                images = images.to(env.device, non_blocking=True)
                targets = targets.to(env.device, non_blocking=True)
                if mixup is not None:
                    if len(images) % 2:
                        images, targets = images[:-1], targets[:-1]
                    images, soft_targets = mixup(images, targets)
                else:
                    soft_targets = targets
                with autocast_context(env.device, amp_dtype):
                    logits = model(images)
                logits = logits.float()
                if criterion is not None:
                    loss = criterion(images, logits, soft_targets)
                else:
                    loss = base_loss(logits, soft_targets)
                loss = loss * weight
                reduced = dist_utils.all_reduce_sum(torch.stack([loss.detach().double().cpu(),
                                                                 torch.tensor(weight, dtype=torch.float64)]), env)
                loss_value = float(reduced[0] / reduced[1].clamp_min(1))
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"the training loss is {loss_value} at epoch {epoch + 1}, step {global_step + 1}; stopping "
                        "(the weights were not updated with it). Try a lower --lr, --clip-grad 1.0, a longer "
                        "--warmup-epochs or --amp none."
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(bare.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(bare.parameters(), cfg.clip_grad)
                    optimizer.step()
                scheduler.step()
                global_step += 1
                epoch_step += 1
                if ema is not None:
                    ema.update(bare, step=global_step)
                sums[0] += loss_value
                sums[1] += 1
                seen_since_log += len(images) * env.world_size
                current_lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
                bar.update(1)
                if global_step % cfg.log_every == 0 or epoch_step == steps_per_epoch:
                    now = time.time()
                    speed = seen_since_log / max(now - t_log, 1e-9)
                    t_log, seen_since_log = now, 0
                    writer.write("step", global_step, epoch=epoch, loss=loss_value, lr=current_lr, img_per_s=speed)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{current_lr:.2e}", img_s=f"{speed:.0f}")
                if quiet_bar and epoch_step % report_every == 0 and epoch_step < steps_per_epoch:
                    done = time.time() - t_epoch
                    rate = (epoch_step - skip) * global_batch / max(done, 1e-9)
                    log.info("epoch %d/%d [%d/%d]  loss %.4f  lr %.2e  %.0f img/s  epoch ETA %s", epoch + 1, cfg.epochs,
                             epoch_step, steps_per_epoch, loss_value, current_lr, rate,
                             format_duration((steps_per_epoch - epoch_step) * global_batch / max(rate, 1e-9)))
                mid_epoch = epoch_step < steps_per_epoch
                if cfg.ckpt_every and global_step % cfg.ckpt_every == 0 and mid_epoch and env.is_main:
                    save_state(run_dir / "last.pt", full_state(epoch, epoch_step))
            bar.close()
            sums = dist_utils.all_reduce_sum(sums, env)
            train_loss = float(sums[0] / max(float(sums[1]), 1.0))
            epoch_time = time.time() - t_epoch
            record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": current_lr,
                                      "epoch_time": epoch_time, "skipped_images": int(sums[2])}
            if int(sums[2]):
                log.warning("epoch %d: skipped %d unreadable image(s) (listed above and in train.log)",
                            epoch + 1, int(sums[2]))
            is_last = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_every == 0 or is_last:
                # The bare module: DDP's forward would broadcast buffers, and shards differ in length.
                # The reported weights were chosen before training (--eval-weights), never by these numbers.
                last_metrics = evaluate_model(bare, eval_loader, env, amp_dtype=amp_dtype, progress=cfg.progress)
                record.update({f"val_{k}": v for k, v in last_metrics.items() if k != "skipped"})
                last_metrics["weights"] = "model"
                if ema is not None:
                    ema_metrics = evaluate_model(ema.module, eval_loader, env, amp_dtype=amp_dtype, progress=cfg.progress)
                    record.update({f"ema_{k}": v for k, v in ema_metrics.items() if k not in ("skipped", "n")})
                    if cfg.eval_weights == "ema":
                        last_metrics = {**ema_metrics, "weights": "ema"}
                top1 = last_metrics["top1"]
                improved = top1 > best["top1"]
                if improved:
                    best = {"top1": top1, "epoch": epoch, "weights": last_metrics["weights"]}
            else:
                improved = False
            epochs_done = epoch + 1
            elapsed = time.time() - t_start
            eta = elapsed / max(epochs_done - start_epoch, 1) * (cfg.epochs - epochs_done)
            writer.write("epoch", global_step, **record)
            msg = f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  lr {current_lr:.2e}"
            if "val_top1" in record:
                msg += f"  {cfg.val_split} top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%"
            if "ema_top1" in record:
                msg += f"  EMA top-1 {record['ema_top1']:.2f}%"
            msg += f"  ({format_duration(epoch_time)}, {steps_per_epoch * global_batch / max(epoch_time, 1e-9):.0f} img/s," \
                   f" elapsed {format_duration(elapsed)}, ETA {format_duration(eta)})"
            log.info(msg)
            if env.is_main:
                save_state(run_dir / "last.pt", full_state(epoch + 1, 0))
                if improved:
                    shutil.copyfile(run_dir / "last.pt", run_dir / ".best.pt.tmp")
                    os.replace(run_dir / ".best.pt.tmp", run_dir / "best.pt")
            dist_utils.barrier(env)
    except NonFiniteLossError as err:
        status = "stopped: non-finite loss"
        writer.write("stop", global_step, reason=str(err))
        last = run_dir / "last.pt"
        log.error("%s Last good checkpoint: %s", err, last if last.exists() else "none (no epoch finished)")
        writer.close()
        if env.is_main and cfg.plot:
            _try_plot(run_dir)
        raise NonFiniteLossError(f"{err} Last good checkpoint: {last if last.exists() else 'none yet'}") from None
    writer.close()

    files = {"last": run_dir / "last.pt", "log": run_dir / "train.log", "metrics": run_dir / "metrics.jsonl",
             "config": run_dir / "config.yaml"}
    if (run_dir / "best.pt").exists():
        files["best"] = run_dir / "best.pt"
    model_path = None
    weights = "ema" if (ema is not None and cfg.eval_weights == "ema") else "model"
    final = ema.module if weights == "ema" else bare
    if amp_dtype is not None or not last_metrics:
        # The reported numbers are those of the saved weights in fp32, what `xcit eval` and
        # `xcit predict` compute (the per-epoch evaluations ran in the training precision).
        last_metrics = {**evaluate_model(final, eval_loader, env, progress=cfg.progress), "weights": weights,
                        "precision": "fp32"}
        log.info("final evaluation of the %s weights in fp32: %s top-1 %.2f%%  top-5 %.2f%%  loss %.4f", weights,
                 cfg.val_split, last_metrics["top1"], last_metrics["top5"], last_metrics["loss"])
    if env.is_main:
        metrics = {**last_metrics, "split": cfg.val_split}
        extra = {"classes": list(data.classes), "data": data.info(cfg), "metrics": metrics,
                 "weights": last_metrics.get("weights", "model"),
                 "train": {"epochs": epochs_done, "steps": global_step, "wall_time": round(time.time() - t_start, 1),
                           "model": cfg.model, "preset": cfg.preset, "lr": lr, "global_batch": global_batch}}
        model_path = save_checkpoint(final, run_dir / "model.pth", extra=extra)
        files["model"] = model_path
        if cfg.plot:
            plot = _try_plot(run_dir)
            if plot is not None:
                files["plot"] = plot
    dist_utils.barrier(env)
    wall = time.time() - t_start
    result = RunResult(run_dir, model_path, {**last_metrics, "split": cfg.val_split}, best["top1"], epochs_done,
                       global_step, wall, status, files)
    if env.is_main:
        (run_dir / "result.json").write_text(json.dumps({
            "status": status, "metrics": result.metrics, "best_top1": best["top1"], "best_epoch": best["epoch"] + 1,
            "epochs": epochs_done, "steps": global_step, "wall_time": round(wall, 1),
            "files": {k: str(v) for k, v in files.items()},
        }, indent=2))
        log.info(result.summary())
    return result


def _try_plot(run_dir: Path) -> Path | None:
    from .plots import plot_run

    try:
        return plot_run(run_dir)
    except (ValueError, OSError) as err:
        log.warning("could not draw the curves: %s", err)
        return None


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
