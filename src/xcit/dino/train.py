"""DINO pretraining of XCiT (:func:`pretrain`): one process or many (``torchrun``), CPU or GPU.

Built from the shared engine (:mod:`xcit.train`): process groups and synchronised BatchNorm,
atomic state files with ``weights_only`` loading, JSON-lines metrics and text log, thread and
mixed-precision settings, the AdamW parameter groups and the warm-up/cosine schedule. The run
directory receives ``last.pt`` (full state, resumable), ``teacher.pth`` (the teacher backbone as a
plain XCiT checkpoint: ``xcit.create_model(checkpoint=...)``), ``metrics.jsonl``, ``train.log``,
``config.yaml`` and ``curves.png``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DataError, TensorImageDataset, build_dataset
from ..data.loader import RepeatAugSampler, build_loader
from ..models import create_model
from ..models.weights import save_checkpoint
from ..train import distributed as dist_utils
from ..train.checkpoint import load_state, rng_state, set_rng_state
from ..train.config import RUNTIME_OPTIONS, rename_options
from ..train.metrics import format_duration, progress_bar
from ..train.optim import build_param_groups
from ..train.run import NonFiniteLossError, OptimStep, Run, autocast_context, default_run_name, launch
from ..train.run import resolve_amp, resume_target, seed_everything, set_threads
from .augment import BatchMultiCrop, MultiCropSpec, PILMultiCrop
from .config import DinoConfig, resolve_config, validate
from .head import DINOHead, MultiCropNet, last_layer_params
from .loss import DINOLoss, koleo_loss
from .schedules import DinoSchedules, build_schedules

log = logging.getLogger("xcit.train")

_CALIBRATION_STEPS = (3, 15)  # --time-budget-min: the first speed measurement, over steps 3..15


@dataclass
class DinoResult:
    """What a finished pretraining produced and where."""

    run_dir: Path
    teacher_path: Path | None
    epochs: float
    steps: int
    wall_time: float
    final_loss: float
    files: dict[str, Path] = field(default_factory=dict)


def build_networks(cfg: DinoConfig, in_chans: int) -> tuple[MultiCropNet, MultiCropNet]:
    """(student, teacher): identical weights; the teacher has no drop path and takes no gradient."""
    arch = {k: getattr(cfg, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "tokens_norm")
            if getattr(cfg, k) is not None}
    nets = []
    for drop_path in (cfg.drop_path, 0.0):
        backbone = create_model(cfg.model, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path, **arch)
        head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        norm_last_layer=cfg.norm_last_layer)
        nets.append(MultiCropNet(backbone, head))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    s_params = [p.detach() for p in student.parameters()]
    t_params = list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError(f"student and teacher differ: {len(s_params)} vs {len(t_params)} parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def _collate_crops(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    from ..data.datasets import SkippedImage

    kept = [b for b in batch if not isinstance(b, SkippedImage)]
    skipped = [b.path for b in batch if isinstance(b, SkippedImage)]
    if not kept:
        return [], torch.empty(0, dtype=torch.long), skipped
    crops = [torch.stack([k[0][i] for k in kept]) for i in range(len(kept[0][0]))]
    return crops, torch.tensor([k[1] for k in kept]), skipped


def build_pretrain_data(cfg: DinoConfig, env: dist_utils.DistEnv):
    """(loader, sampler, data info) of the multi-crop training images of this process (labels unused)."""
    dataset = build_dataset(cfg.data, cfg.train_split, in_chans=cfg.in_chans)
    in_chans = dataset.in_chans
    mean = tuple(cfg.mean) if cfg.mean else tuple(dataset.mean)
    std = tuple(cfg.std) if cfg.std else tuple(dataset.std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"expected {in_chans} mean/std values (one per channel), got {list(mean)} / {list(std)}")
    spec = MultiCropSpec.from_config(cfg)
    sampler = RepeatAugSampler(len(dataset), num_replicas=env.world_size, rank=env.rank, seed=cfg.seed)
    if len(sampler) < cfg.batch_size:
        raise DataError(f"expected at least --batch-size {cfg.batch_size} images per process, got {len(sampler)} "
                        f"({len(dataset)} images over {env.world_size} process(es)); lower --batch-size")
    if isinstance(dataset, TensorImageDataset):
        loader = build_loader(dataset, sampler, cfg.batch_size, batch_transform=BatchMultiCrop(spec, mean, std),
                              drop_last=True)
    else:
        dataset.transform = PILMultiCrop(spec, mean, std)
        loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                             collate_fn=_collate_crops, drop_last=True,
                                             pin_memory=env.device.type == "cuda", persistent_workers=cfg.workers > 0)
    info = {"img_size": cfg.global_size, "in_chans": in_chans, "mean": list(mean), "std": list(std), "crop_pct": 1.0,
            "interpolation": "bicubic", "dataset": str(cfg.data)}
    return loader, sampler, info


def pretrain(config: DinoConfig | dict | None = None, **options: Any) -> DinoResult:
    """DINO-pretrain an XCiT as ``config`` says (defaults < preset < config < ``options``).

    ``pretrain()`` alone runs the Fashion-MNIST preset. Under ``torchrun`` it is data-parallel.
    Bad options raise ``ValueError`` before anything runs; a diverging loss raises
    :class:`~xcit.train.NonFiniteLossError` (the last good ``last.pt`` is kept).
    """
    return launch(_pretrain, config, options, DinoConfig, resolve_config, validate)


def _resume(cfg: DinoConfig) -> tuple[DinoConfig, dict | None]:
    if not cfg.resume:
        return cfg, None
    state = load_state(resume_target(cfg.resume, cfg.output))
    if "teacher" not in state or "dino_loss" not in state:
        raise ValueError(f"expected a DINO state written by `xcit dino`, got {state['path']} (an `xcit train` state?)")
    saved = rename_options({k: v for k, v in state["config"].items() if k != "_derived"}, DinoConfig.__dataclass_fields__)
    saved = {k: v for k, v in saved.items() if k in DinoConfig.__dataclass_fields__}
    ignored = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_OPTIONS and k in saved and saved[k] != v]
    if ignored:
        log.warning("resuming with the run's saved configuration; ignored new value(s) for: %s", ", ".join(ignored))
    resumed = DinoConfig(**{**saved, **{k: getattr(cfg, k) for k in RUNTIME_OPTIONS}, "overwrite": False})
    validate(resumed)
    return resumed, state


def _pretrain(cfg: DinoConfig, env: dist_utils.DistEnv) -> DinoResult:
    cfg, state = _resume(cfg)
    thread_note = set_threads(cfg.threads, env)
    loader, sampler, data_info = build_pretrain_data(cfg, env)
    steps_per_epoch = len(loader)
    global_batch = cfg.batch_size * env.world_size
    lr = cfg.lr * global_batch / 256
    amp_dtype = resolve_amp(cfg.amp, env.device)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    student, teacher = build_networks(cfg, data_info["in_chans"])
    n_crops = MultiCropSpec.from_config(cfg).n_crops
    dino_loss = DINOLoss(cfg.out_dim, n_crops, cfg.student_temp, cfg.center_momentum).to(env.device)
    student.to(env.device)
    teacher.to(env.device)
    run = Run.open(cfg, env, default_run_name("dino", cfg.data, cfg.model), resuming=state is not None,
                   output=Path(state["path"]).parent if state is not None and not cfg.output else None,
                   elapsed_before=float(state.get("elapsed", 0.0)) if state is not None else 0.0)
    if env.distributed and cfg.sync_bn:  # before the optimizer: the swap makes new BatchNorm modules (same keys)
        student = dist_utils.convert_batchnorm(student, env.device)
        teacher = dist_utils.convert_batchnorm(teacher, env.device).requires_grad_(False)
    # DINO's get_params_groups: biases and 1-d parameters exempt; the rest (temperature, cls token) decayed
    groups = build_param_groups(student, cfg.weight_decay, exempt_per_channel=cfg.wd_exempt_per_channel,
                                read_no_weight_decay=cfg.wd_exempt_per_channel)
    trainable = [p for p in student.parameters() if p.requires_grad]
    step = OptimStep(torch.optim.AdamW(groups, lr=lr), trainable, env, amp_dtype, clip_grad=cfg.clip_grad,
                     clip_mode=cfg.clip_grad_mode, hint="Try a lower --lr, a smaller --clip-grad or --amp none.")
    total_steps = (state or {}).get("scheduler", {}).get("total_steps") or cfg.epochs * steps_per_epoch
    schedules = build_schedules(cfg, lr, steps_per_epoch, total_steps)
    if state is not None:
        student.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        dino_loss.load_state_dict(state["dino_loss"])
        step.load_state_dict({"optimizer": state["optimizer"], "scaler": state.get("scaler"), "steps": state["step"]})
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d of %d", state["path"], step.steps, total_steps)
    budget = TimeBudget(cfg.time_budget_min, run, step.steps, cfg.epochs * steps_per_epoch)
    net = student
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(student, device_ids=[env.device] if env.device.type == "cuda" else None)
    frozen_last = last_layer_params(student)

    def derived() -> dict:
        return _derived(cfg, env, student, lr, steps_per_epoch, total_steps, n_crops, amp_dtype)

    def full_state() -> dict:
        opt = step.state_dict()
        return {"model": student.state_dict(), "teacher": teacher.state_dict(), "dino_loss": dino_loss.state_dict(),
                "optimizer": opt["optimizer"], "scheduler": {"total_steps": total_steps}, "scaler": opt["scaler"],
                "epoch": step.steps // steps_per_epoch, "step": step.steps, "elapsed": run.elapsed(),
                "config": cfg.to_dict(), "data": data_info, "rng": rng_state()}

    run.save_config(cfg.to_dict(), derived())
    _describe(cfg, data_info, derived(), thread_note)
    net.train()
    teacher.train()  # as DINO: batch statistics in the stem's BatchNorm for both networks
    loss_value, epoch_losses, skipped_images, skipped_total = float("nan"), [], 0, 0
    try:
        while step.steps < total_steps:
            epoch, start = divmod(step.steps, steps_per_epoch)
            sampler.set_epoch(epoch, start * cfg.batch_size)
            bar = progress_bar(steps_per_epoch, f"dino epoch {epoch + 1}", cfg.progress and env.is_main)
            bar.update(start)
            t_log, seen = time.time(), 0
            for crops, _, skipped in loader:
                skipped_images += len(skipped)
                if not crops:  # every image of the batch unreadable (listed in train.log)
                    continue
                fitted = budget.fit(step.steps, total_steps)
                if fitted is not None:
                    total_steps = fitted
                    schedules = build_schedules(cfg, lr, steps_per_epoch, total_steps)
                if step.steps >= total_steps:
                    break
                values = schedules.at(step.steps)
                loss_value = _step(net, student, teacher, dino_loss, step, crops, values, schedules, frozen_last,
                                   cfg, env, amp_dtype)
                epoch_losses.append(loss_value)
                seen += crops[0].shape[0] * env.world_size
                bar.update(1)
                if step.steps % cfg.log_every == 0 or step.steps == total_steps:
                    speed = seen / max(time.time() - t_log, 1e-9)
                    t_log, seen = time.time(), 0
                    run.write("step", step.steps, epoch=step.steps / steps_per_epoch, loss=loss_value,
                              teacher_entropy=dino_loss.last_entropy, img_per_s=speed, **values)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{values['lr']:.1e}")
                    if bar.disable and cfg.progress:
                        log.info("step %d/%d (epoch %.2f)  loss %.4f  teacher entropy %.2f  lr %.2e  wd %.3f  "
                                 "momentum %.4f  T_t %.3f  %.0f img/s  elapsed %s", step.steps, total_steps,
                                 step.steps / steps_per_epoch, loss_value, dino_loss.last_entropy, values["lr"],
                                 values["wd"], values["momentum"], values["teacher_temp"], speed,
                                 format_duration(run.elapsed()))
                if cfg.ckpt_every and step.steps % cfg.ckpt_every == 0:
                    run.save("last.pt", full_state)
                if step.steps % steps_per_epoch == 0:
                    break
            bar.close()
            done_epoch = step.steps / steps_per_epoch
            mean_loss = sum(epoch_losses) / max(len(epoch_losses), 1)
            skipped_images = int(dist_utils.all_reduce_sum(torch.tensor([skipped_images]), env)[0])
            run.write("epoch", step.steps, epoch=done_epoch, train_loss=mean_loss, elapsed=round(run.elapsed(), 1),
                      skipped_images=skipped_images)
            log.info("epoch %.2f/%.2f  mean loss %.4f  (elapsed %s)%s", done_epoch, total_steps / steps_per_epoch,
                     mean_loss, format_duration(run.elapsed()),
                     f"  skipped {skipped_images} unreadable image(s) (listed in train.log)" if skipped_images else "")
            epoch_losses, skipped_total, skipped_images = [], skipped_total + skipped_images, 0
            run.save("last.pt", full_state)
            dist_utils.barrier(env)
    except NonFiniteLossError as err:
        run.write("stop", step.steps, reason=str(err))
        run.finish("stopped: non-finite loss", error=str(err), steps=step.steps)
        raise NonFiniteLossError(f"{err} Last good checkpoint: {run.path / 'last.pt'}") from None
    if budget.seconds:
        run.save_config(cfg.to_dict(), derived())  # the total steps the budget allowed
    teacher_path = None
    if env.is_main:
        extra = {"data": data_info, "dino": {"epochs": round(step.steps / steps_per_epoch, 3), "steps": step.steps,
                                             "wall_time": round(run.elapsed(), 1), "final_loss": loss_value,
                                             "config": cfg.to_dict()}}
        # synchronised BatchNorm keeps BatchNorm2d's state dict
        teacher_path = save_checkpoint(teacher.backbone, run.path / "teacher.pth", extra=extra)
        run.files["teacher"] = teacher_path
    if cfg.plot:
        from .plots import plot_pretraining

        run.plot(plot_pretraining)
    record = run.finish("completed", epochs=step.steps / steps_per_epoch, steps=step.steps, final_loss=loss_value,
                        skipped_images={"train": skipped_total})
    log.info("done: %d steps (%.2f epochs) in %s; teacher backbone: %s", step.steps, step.steps / steps_per_epoch,
             format_duration(record["wall_time"]), teacher_path)
    dist_utils.barrier(env)
    return DinoResult(run.path, teacher_path, step.steps / steps_per_epoch, step.steps, record["wall_time"], loss_value,
                      dict(run.files))


def _derived(cfg: DinoConfig, env: dist_utils.DistEnv, student: MultiCropNet, lr: float, steps_per_epoch: int,
             total_steps: int, n_crops: int, amp_dtype: torch.dtype | None) -> dict:
    """The values a run derives from its options (``config.yaml``'s ``_derived``)."""
    return {"lr": lr, "global_batch": cfg.batch_size * env.world_size, "world_size": env.world_size,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "n_crops": n_crops, "device": str(env.device),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
            "params_backbone": sum(p.numel() for p in student.backbone.parameters()),
            "params_head": sum(p.numel() for p in student.head.parameters()), "torch_threads": torch.get_num_threads()}


def _describe(cfg: DinoConfig, data_info: dict, info: dict, thread_note: str) -> None:
    log.info("DINO pretraining of %s (%d-channel %dpx globals, %d local %dpx) on %s: %.2fM backbone + %.2fM head "
             "parameters, K=%d, %d crops, global batch %d (--batch-size %d per process), lr %.2e, %d steps (%d per "
             "epoch), %s, %s, %d thread(s)%s", cfg.model, data_info["in_chans"], cfg.global_size, cfg.local_crops,
             cfg.local_size, cfg.data, info["params_backbone"] / 1e6, info["params_head"] / 1e6, cfg.out_dim,
             info["n_crops"], info["global_batch"], cfg.batch_size, info["lr"], info["total_steps"],
             info["steps_per_epoch"], info["device"], info["amp"], info["torch_threads"],
             f", time budget {cfg.time_budget_min} min" if cfg.time_budget_min else "")
    if thread_note:
        log.info(thread_note)


class TimeBudget:
    """``--time-budget-min``: the speed is measured over steps 3..15, then again every 12 steps (which adapts
    to a machine that speeds up or slows down), and the run's total steps are fitted to the time left."""

    FIRST, LAST = _CALIBRATION_STEPS

    def __init__(self, minutes: float | None, run: Run, step: int, max_steps: int) -> None:
        self.seconds = minutes * 60 if minutes else None
        self.run, self.mark, self.max_steps = run, (step, None), max_steps

    def fit(self, step: int, total_steps: int) -> int | None:
        """A new total step count when it is time to refit (``step`` itself when the budget is used up), else None."""
        interval = self.LAST - self.FIRST
        if not self.seconds or step < self.FIRST or (self.mark[1] is not None and step - self.mark[0] < interval):
            return None
        previous, self.mark = self.mark, (step, time.time())
        if previous[1] is None:
            return None
        per_step = (time.time() - previous[1]) / (step - previous[0])
        env, cfg_minutes = self.run.env, self.seconds / 60
        if dist_utils.broadcast_object(self.run.elapsed() + per_step >= self.seconds, env):
            log.warning("time budget of %.1f min used up at step %d of %d: stopping here", cfg_minutes, step, total_steps)
            return step
        fit = dist_utils.broadcast_object(step + int((0.98 * self.seconds - self.run.elapsed()) / per_step), env)
        new_total = max(step + 1, min(fit, self.max_steps))
        if abs(new_total - total_steps) > 0.05 * total_steps:
            log.info("time budget %.1f min: %.3f s/step, so %d steps in all", cfg_minutes, per_step, new_total)
        return new_total


def _step(net, student, teacher, dino_loss, step: OptimStep, crops, values: dict, schedules: DinoSchedules,
          frozen_last: list, cfg: DinoConfig, env: dist_utils.DistEnv, amp_dtype) -> float:
    """One optimisation step; returns the loss averaged over processes."""
    crops = [c.to(env.device, non_blocking=True) for c in crops]
    for g in step.optimizer.param_groups:
        g["lr"] = values["lr"] * g.get("lr_scale", 1.0)
        if g["decayed"]:
            g["weight_decay"] = values["wd"]
    with autocast_context(env.device, amp_dtype):
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        if cfg.koleo_weight > 0:
            student_out, features = net(crops, return_features=True)
        else:
            student_out = net(crops)
    loss = dino_loss(student_out, teacher_out, values["teacher_temp"], env)
    if cfg.koleo_weight > 0:  # on the student's features of the 2 global crops, one crop at a time
        koleo = sum(koleo_loss(f) for f in features[:len(teacher_out)].chunk(2)) / 2
        loss = loss + cfg.koleo_weight * koleo
        values["koleo"] = float(koleo.detach())

    def freeze_last_layer() -> None:
        if step.steps < schedules.freeze_steps:
            for p in frozen_last:
                p.grad = None

    value = step(loss, before_update=freeze_last_layer)
    update_teacher(student, teacher, values["momentum"])
    return value
