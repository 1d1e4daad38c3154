"""Segmentation training on the run engine (:mod:`xcit.train.run`): what is segmentation's own is here
(image/mask folders, the segmenter, its losses and mIoU); run folder, logs, checkpoints and the
optimiser step are the engine's, as for every training command."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models import MODELS, resolve_name
from ..train import distributed as dist_utils
from ..train.checkpoint import read_task_checkpoint
from ..config import option
from ..train.config import PyramidOptions, merge_with_preset, validate_dense_options
from ..train.metrics import format_duration, progress_bar
from ..train.optim import PolySchedule, dense_param_groups
from ..train.plots import plot_history
from ..train.run import (
    OptimStep,
    Run,
    default_run_name,
    data_parallel,
    endless,
    launch,
    resolve_amp,
    resume_file,
    run_process,
    set_lr,
    set_threads,
    time_up,
    train_sampler,
)
from .data import DatasetInfo, SegmentationFolder, TrainTransform, default_palette, infer, split_dirs, worker_init
from .metrics import ConfusionMatrix, format_metrics
from .model import FORMAT, build_segmenter, load_segmenter, segmenter_config, segmenter_from_config

log = logging.getLogger("xcit.train")

HEADS = ("fpn", "upernet")
EVAL_MODES = ("whole", "slide")


def int_or_none(text: str) -> int | None:
    """An integer, or None for the word 'none' (``--scale none``: keep the images' own size)."""
    if str(text).strip().lower() == "none":
        return None
    return int(text)


@dataclass
class EvalSettings:
    """How images are predicted at test time (stored in checkpoints, reused by eval / predict)."""

    mode: str = "whole"  # or "slide"
    scale: list[int] | None = field(default_factory=lambda: [2048, 512])  # keep-ratio test rescale; None: as is
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # slide window
    stride: list[int] = field(default_factory=lambda: [341, 341])  # slide step
    flip: bool = False


@dataclass
class SegmentConfig(PyramidOptions):
    """Every option of ``xcit segment train``. Defaults are the paper's ADE20k recipe (REFERENCE 4): AdamW
    lr 6e-5, wd 0.01, poly with warm-up, 512x512 crops, 2 images per process (16 over the official 8 GPUs)."""

    # --- data
    data: str | None = option(None, "dataset root (ROOT/images/SPLIT, ROOT/annotations/SPLIT, optional "
                            "ROOT/dataset.yaml)", "data")
    train_split: str = option("training", "training split", "data")
    val_split: str = option("validation", "evaluation split", "data")
    num_classes: int | None = option(None, "classes (default: those in ROOT/dataset.yaml)", "data")
    ignore_index: int | None = option(None, "mask value to ignore (default: dataset.yaml's, else 255)", "data")
    reduce_zero_label: bool | None = option(None, "0 is 'other' (ignored) and k is class k-1, as in ADE20k (default: "
                                          "dataset.yaml's, else off)", "data")
    # --- model
    head: str = option("upernet", "decode head: Semantic FPN or UperNet", "model", HEADS)
    channels: int | None = option(None, "head width (default: UperNet 512, Semantic FPN 128)", "model")
    fpn_channels: int | None = option(None, "Semantic FPN neck width (default: the backbone's, as the official "
                                    "configs: 384 for small)", "model")
    norm: str = option("bn", "head norm: BatchNorm (synchronised when distributed) or GroupNorm", "model", ("bn", "gn"))
    aux: bool | None = option(None, "auxiliary FCN head (default: on for UperNet)", "model")
    aux_weight: float = option(0.4, "auxiliary loss weight", "model")
    grad_checkpointing: bool = option(False, "recompute blocks in backward to save memory", "model")
    # --- optimisation
    iters: int = option(80000, "training iterations", "optim")
    lr: float = option(6e-5, "AdamW learning rate (not scaled with the batch, as mmseg)", "optim")
    weight_decay: float = option(0.01, "AdamW weight decay", "optim")
    warmup_iters: int = option(1500, "linear warm-up iterations", "optim")
    warmup_ratio: float = option(1e-6, "warm-up starts at this fraction of the rate", "optim")
    power: float = option(1.0, "poly power", "optim")
    min_lr: float = option(0.0, "final learning rate", "optim")
    # --- augmentation
    crop_size: list[int] = option([512, 512], "random crop H [W]", "augment")
    scale: list[int] | None = option([2048, 512], "base rescale LONG SHORT, or 'none' to keep the images' own size",
                                   "augment", type=int_or_none)
    ratio_range: list[float] = option([0.5, 2.0], "random rescale range", "augment", nargs=2)
    cat_max_ratio: float = option(0.75, "re-draw crops where one class exceeds this share", "augment")
    photometric: bool = option(True, "photometric jitter", "augment")
    hflip: float = option(0.5, "horizontal flip probability", "augment")
    # --- evaluation
    eval_every: int = option(8000, "evaluate every N iterations (0: only at the end)", "eval")
    eval_mode: str = option("whole", "test-time inference: whole image or sliding window", "eval", EVAL_MODES)
    eval_scale: list[int] | None = option(None, "keep-ratio rescale before inference: LONG SHORT, or 'none' for the "
                                        "native size (default: as --scale)", "eval", type=int_or_none)
    eval_crop_size: list[int] | None = option(None, "slide window H [W] (default: --crop-size)", "eval")
    eval_stride: list[int] | None = option(None, "slide step H [W] (default: 2/3 of the window)", "eval")
    eval_flip: bool = option(False, "add the mirrored prediction", "eval")
    # --- run (the options shared by every training command are in RunOptions)
    preset: str | None = option(None, "option preset: ade20k (the paper's recipe, the default)", "run")

    @property
    def eval(self) -> EvalSettings:
        """The test-time settings these options give (the defaults follow the training crops)."""
        crop = list(self.eval_crop_size or self.crop_size)
        # eval_scale None: as --scale; [] ('none' given): the native size
        return EvalSettings(mode=self.eval_mode, scale=self.scale if self.eval_scale is None else self.eval_scale or None,
                            crop_size=crop, stride=list(self.eval_stride or [max(1, 2 * s // 3) for s in crop]),
                            flip=self.eval_flip)


TrainConfig = SegmentConfig  # the name before the one dialect
PRESETS: dict[str, dict[str, Any]] = {"ade20k": {}}


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> SegmentConfig:
    """A :class:`SegmentConfig` from user values: defaults < preset < ``values`` < ``kwargs`` (validated)."""
    given = {**(values or {}), **kwargs}
    given = {k.replace("-", "_"): v for k, v in given.items()}
    if "flip" in given and "hflip" not in given:  # the training flip's name before the one dialect
        given["hflip"] = given.pop("flip")
    merged = merge_with_preset(given, list(fields(SegmentConfig)), PRESETS, "", (
        "output", "resume", "data", "model", "pretrained", "clip_grad", "time_budget_min"), what="segmentation",
        choose=lambda data: "ade20k")
    # 'none' (read as a list of one None) keeps the images' size: None for training, [] at test time (where
    # None means "as --scale")
    if merged.get("scale") == [None]:
        merged["scale"] = None
    if merged.get("eval_scale") == [None]:
        merged["eval_scale"] = []
    for key in ("crop_size", "eval_crop_size", "eval_stride"):
        value = merged.get(key)
        if value is not None:
            if not isinstance(value, list) or len(value) not in (1, 2) or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"expected {key} as H [W] with positive integers, got {value!r}")
            merged[key] = [value[0], value[-1]]
    cfg = SegmentConfig(**merged)
    if cfg.time_budget_min == 0:
        cfg.time_budget_min = None
    validate(cfg)
    return cfg


def validate(cfg: SegmentConfig) -> None:
    """Raise ``ValueError`` saying what was expected for an option that cannot work, before anything runs."""
    if not cfg.data:
        raise ValueError("expected --data ROOT (ROOT/images/SPLIT and ROOT/annotations/SPLIT)")
    validate_dense_options(cfg)
    if isinstance(cfg.iters, bool) or not isinstance(cfg.iters, int) or cfg.iters < 1:
        raise ValueError(f"expected iters to be an integer >= 1, got {cfg.iters!r}")
    for name in ("min_lr", "aux_weight"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"expected {name} >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.cat_max_ratio <= 1:
        raise ValueError(f"expected cat_max_ratio in [0, 1], got {cfg.cat_max_ratio}")
    if cfg.scale is not None and (len(cfg.scale) != 2 or min(cfg.scale) < 1):
        raise ValueError(f"expected --scale LONG SHORT (e.g. 2048 512) or 'none', got {cfg.scale}")
    if cfg.eval_scale and (len(cfg.eval_scale) != 2 or min(cfg.eval_scale) < 1):
        raise ValueError(f"expected --eval-scale LONG SHORT or 'none', got {cfg.eval_scale}")
    if len(cfg.ratio_range) != 2 or not 0 < cfg.ratio_range[0] <= cfg.ratio_range[1]:
        raise ValueError(f"expected --ratio-range LOW HIGH with 0 < LOW <= HIGH, got {cfg.ratio_range}")


def _resolve_dataset(cfg: SegmentConfig) -> tuple[DatasetInfo, int, int, bool]:
    info = DatasetInfo.load(cfg.data) or DatasetInfo()
    num_classes = cfg.num_classes if cfg.num_classes is not None else len(info.classes)
    if num_classes < 1:
        raise ValueError(f"expected --num-classes (or 'classes' in {Path(cfg.data) / 'dataset.yaml'}), got none")
    if info.classes and len(info.classes) != num_classes:
        raise ValueError(f"--num-classes {num_classes} but {Path(cfg.data) / 'dataset.yaml'} lists {len(info.classes)} classes")
    ignore = cfg.ignore_index if cfg.ignore_index is not None else info.ignore_index
    rzl = cfg.reduce_zero_label if cfg.reduce_zero_label is not None else info.reduce_zero_label
    info.classes = info.classes or [f"class{i}" for i in range(num_classes)]
    info.palette = info.palette or default_palette(num_classes)
    info.ignore_index, info.reduce_zero_label = ignore, rzl
    return info, num_classes, ignore, rzl


@torch.no_grad()
def evaluate(model, dataset: SegmentationFolder, settings: EvalSettings, ctx: dist_utils.DistEnv | None = None,
             amp_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Confusion-matrix metrics of ``model`` on ``dataset`` (sharded over processes when distributed)."""
    ctx = ctx or dist_utils.DistEnv(device=next(model.parameters()).device)
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    indices = range(ctx.rank, len(dataset), ctx.world_size)
    bar = progress_bar(len(indices), "eval", progress and ctx.is_main)
    for i in indices:
        image, mask = dataset.load(i)
        probs = infer(net, image, mode=settings.mode, scale=settings.scale, crop_size=settings.crop_size,
                      stride=settings.stride, flip=settings.flip, amp_dtype=amp_dtype)
        cm.update(probs.argmax(0), mask)
        bar.update(1)
    bar.close()
    cm.all_reduce()
    net.train(was_training)
    return cm.compute()


def _checkpoint(model, cfg: SegmentConfig, info: DatasetInfo, extra: dict | None = None) -> dict:
    net = getattr(model, "module", model)
    meta = {"classes": info.classes, "palette": info.palette, "ignore_index": info.ignore_index,
            "reduce_zero_label": info.reduce_zero_label, "eval": asdict(cfg.eval), "train_config": cfg.to_dict()}
    return {"format": FORMAT, "config": segmenter_config(net), "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "meta": meta, **(extra or {})}


def train(config: SegmentConfig | dict | None = None, **options: Any) -> dict:
    """Train a segmenter as ``config`` says; returns the run's result (also in OUTPUT/result.json)."""
    return launch(_train, config, options, SegmentConfig, resolve_config, validate)


def _train(cfg: SegmentConfig, env: dist_utils.DistEnv) -> dict:
    thread_note = set_threads(cfg.threads, env)
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    raw = None
    if cfg.resume:  # rebuild exactly the saved model; the backbone init is not needed
        raw = read_task_checkpoint(resume_file(cfg.resume, cfg.output), FORMAT, "segment")
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"expected --data to be a dataset folder, got {cfg.data}, which does not exist")
    info, num_classes, ignore, rzl = _resolve_dataset(cfg)
    amp_dtype = resolve_amp(cfg.amp, env.device)
    tr_img, tr_msk = split_dirs(cfg.data, cfg.train_split)
    va_img, va_msk = split_dirs(cfg.data, cfg.val_split)
    transform = TrainTransform(cfg.crop_size, cfg.scale, cfg.ratio_range, cfg.cat_max_ratio, cfg.hflip, cfg.photometric,
                               ignore, seed=cfg.seed + env.rank)
    train_set = SegmentationFolder(tr_img, tr_msk, num_classes, ignore_index=ignore, reduce_zero_label=rzl, transform=transform)
    val_set = SegmentationFolder(va_img, va_msk, num_classes, ignore_index=ignore, reduce_zero_label=rzl)
    sampler = train_sampler(train_set, cfg.batch_size, env, cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=env.device.type == "cuda", worker_init_fn=worker_init, persistent_workers=False)
    if raw is not None:
        model = segmenter_from_config(raw["config"])
        model.load_state_dict(raw["model"])
    else:
        drop_path = cfg.drop_path
        if drop_path is None:
            drop_path = MODELS[resolve_name(cfg.model).arch].drop_path_rate if cfg.model else 0.0
        arch = cfg.arch()
        model = build_segmenter(num_classes, cfg.model, cfg.pretrained, head=cfg.head, out_indices=cfg.out_indices,
                                drop_path_rate=drop_path, arch=arch, channels=cfg.channels, norm=cfg.norm, aux=cfg.aux,
                                fpn_channels=cfg.fpn_channels)
    run = Run.open(cfg, env, default_run_name("segment", cfg.data, cfg.model or "custom"), resuming=raw is not None,
                   elapsed_before=raw["train_state"]["elapsed"] if raw else 0.0)
    model.backbone.set_grad_checkpointing(cfg.grad_checkpointing)
    model, net = data_parallel(model.to(env.device), env, cfg.sync_bn)  # SyncBN on GPUs, all-reduce BN on CPU
    groups = dense_param_groups(model, cfg.weight_decay, cfg.wd_rule, exempt_per_channel=cfg.wd_exempt_per_channel)
    step = OptimStep(torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999)), model.parameters(), env, amp_dtype,
                     clip_grad=cfg.clip_grad, clip_mode=cfg.clip_grad_mode,
                     hint="Try a lower --lr, a longer --warmup-iters, --clip-grad or --amp none.")
    time_limit = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    schedule = PolySchedule(cfg.lr, cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.power, cfg.min_lr, time_limit)
    best = -1.0
    if raw is not None:
        step.load_state_dict({**raw["train_state"], "steps": raw["train_state"]["step"]})
        best = raw["train_state"]["best"]
        log.info("resumed from %s at step %d (%.1f min trained)", run.path / "last.pt", step.steps, run.elapsed_before / 60)
    run.save_config(cfg.to_dict(), {"world_size": env.world_size, "global_batch": cfg.batch_size * env.world_size,
                                    "device": str(env.device), "eval": asdict(cfg.eval)})
    log.info("training %s on %d images (%d classes), validating on %d; %.2f M parameters; %d process(es) on %s; up to %d "
             "iterations of %d images (--batch-size %d per process)%s%s", model.head_config["head"], len(train_set),
             num_classes, len(val_set), sum(p.numel() for p in model.parameters()) / 1e6, env.world_size, env.device,
             cfg.iters, cfg.batch_size * env.world_size, cfg.batch_size,
             f" or {cfg.time_budget_min:g} min" if time_limit else "", f"; {thread_note}" if thread_note else "")

    def state() -> dict:
        return _checkpoint(model, cfg, info, {"train_state": {**step.state_dict(), "step": step.steps,
                                                              "elapsed": run.elapsed(), "best": best}})

    def run_eval() -> dict:
        nonlocal best
        metrics = evaluate(model, val_set, cfg.eval, env, amp_dtype, progress=cfg.progress)
        run.write("eval", step.steps, elapsed=round(run.elapsed(), 1), miou=metrics["miou"],
                  pixel_acc=metrics["pixel_acc"], mean_acc=metrics["mean_acc"], iou=metrics["iou"])
        log.info("[eval] step %d: mIoU %.2f  pixel acc %.2f  IoU %s", step.steps, 100 * metrics["miou"],
                 100 * metrics["pixel_acc"], " ".join(f"{n}={100 * v:.1f}" for n, v in zip(info.classes, metrics["iou"])
                                                      if not math.isnan(v))[:400])
        if metrics["miou"] > best:
            best = metrics["miou"]
            run.save("best.pt", _checkpoint(model, cfg, info, {"metrics": metrics, "step": step.steps}))
        run.plot(lambda d: plot_history(d / "metrics.jsonl", d / "curves.png"))
        return metrics

    batches = endless(loader, sampler)
    net.train()
    window, seen, t_log = [], 0, time.time()
    bar = progress_bar(cfg.iters, "train", cfg.progress and env.is_main)
    bar.update(step.steps)
    while step.steps < cfg.iters:
        if time_up(run, cfg.time_budget_min):
            log.info("time budget of %g min reached at step %d", cfg.time_budget_min, step.steps)
            break
        lr = schedule.lr(step.steps, run.elapsed())
        set_lr(step.optimizer, lr)
        images, masks = next(batches)
        images, masks = images.to(env.device, non_blocking=True), masks.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = net(images)
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=ignore)
        aux_loss = F.cross_entropy(aux.float(), masks, ignore_index=ignore) if aux is not None else None
        total = loss + cfg.aux_weight * aux_loss if aux_loss is not None else loss
        value = step(total, parts={"decode": loss, **({"aux": aux_loss} if aux_loss is not None else {})})
        bar.update(1)
        window.append(value)
        seen += images.shape[0] * env.world_size
        if step.steps % cfg.log_every == 0 or step.steps == 1:
            rate = seen / max(time.time() - t_log, 1e-9)
            run.write("train", step.steps, loss=sum(window) / len(window), decode_loss=loss.item(),
                      aux_loss=aux_loss.item() if aux_loss is not None else None, lr=lr,
                      elapsed=round(run.elapsed(), 1), img_per_s=round(rate, 2))
            eta = (cfg.iters - step.steps) * (time.time() - t_log) / max(len(window), 1)
            if time_limit:
                eta = min(eta, time_limit - run.elapsed())
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f img/s  elapsed %s  eta %s", step.steps, cfg.iters,
                     sum(window) / len(window), lr, rate, format_duration(run.elapsed()), format_duration(max(eta, 0)))
            window, seen, t_log = [], 0, time.time()
        if cfg.eval_every and step.steps % cfg.eval_every == 0 and step.steps < cfg.iters:
            run_eval()
        if cfg.ckpt_every and step.steps % cfg.ckpt_every == 0:
            run.save("last.pt", state)
    bar.close()
    run.save("last.pt", state)
    metrics = run_eval()
    log.info("%s", format_metrics(metrics, info.classes))
    log.info("finished at step %d after %s; checkpoints in %s (last.pt, best.pt)", step.steps,
             format_duration(run.elapsed()), run.path)
    run.finish("completed", steps=step.steps, elapsed_min=round(run.elapsed() / 60, 2), metrics=metrics,
               classes=info.classes, best_miou=best)
    return metrics


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "validation", settings: EvalSettings | None = None,
                        device: str = "auto", amp: str = "none", num_classes: int | None = None,
                        ignore_index: int | None = None, reduce_zero_label: bool | None = None) -> tuple[dict, list[str]]:
    """Metrics of a segmentation checkpoint on ``data``/``split``; returns (metrics, class names)."""
    with run_process(device) as ctx:
        model, meta = load_segmenter(checkpoint, map_location="cpu")
        model.to(ctx.device)
        n = num_classes or model.num_classes
        if n != model.num_classes:
            raise ValueError(f"expected --num-classes {model.num_classes} (the checkpoint's), got {n}")
        ignore = ignore_index if ignore_index is not None else meta.get("ignore_index", 255)
        rzl = reduce_zero_label if reduce_zero_label is not None else meta.get("reduce_zero_label", False)
        images, masks = split_dirs(data, split)
        dataset = SegmentationFolder(images, masks, n, ignore_index=ignore, reduce_zero_label=rzl)
        if settings is None:
            settings = EvalSettings(**meta.get("eval", {}))
        metrics = evaluate(model, dataset, settings, ctx, resolve_amp(amp, ctx.device), progress=True)
        classes = meta.get("classes") or [f"class{i}" for i in range(n)]
        return metrics, classes
