"""Segmentation training and evaluation loops (thin: the engine pieces live in :mod:`.engine`)."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import MODELS, resolve_name
from ..models.weights import load_file
from ..train import distributed as dist_utils
from ..train.checkpoint import resume_path as resume_state_path
from ..train.checkpoint import save_state
from ..train.run import resolve_amp
from ..train.metrics import MetricsWriter
from ..train.optim import PolySchedule, dense_param_groups
from ..train.plots import plot_history
from .data import DatasetInfo, SegmentationFolder, TrainTransform, default_palette, infer, split_dirs, worker_init
from .metrics import ConfusionMatrix, format_metrics
from .model import FORMAT, build_segmenter, load_segmenter, segmenter_config, segmenter_from_config


@dataclass
class EvalSettings:
    """How images are predicted at test time (stored in checkpoints, reused by eval / predict)."""

    mode: str = "whole"  # or "slide"
    scale: list[int] | None = field(default_factory=lambda: [2048, 512])  # keep-ratio test rescale; None: as is
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # slide window
    stride: list[int] = field(default_factory=lambda: [341, 341])  # slide step
    flip: bool = False


@dataclass
class TrainConfig:
    """Defaults are the paper's ADE20k recipe (REFERENCE 4): AdamW lr 6e-5, wd 0.01, poly, 512 crops."""

    data: str = ""
    out: str = "runs/segment"
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int | None = None  # default: len(classes) in ROOT/dataset.yaml
    ignore_index: int | None = None  # default: dataset.yaml's, else 255
    reduce_zero_label: bool | None = None  # default: dataset.yaml's, else False
    # model
    backbone: str | None = None  # e.g. xcit_small_12_p16
    pretrained: str | None = None  # classification or DINO checkpoint for the trunk
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    out_indices: list[int] | None = None
    drop_path: float | None = None  # default: the named model's dense-task rate, else 0
    head: str = "upernet"
    channels: int | None = None  # head width: 512 UperNet, 128 Semantic FPN
    fpn_channels: int | None = None  # Semantic FPN neck width; default: the backbone's (official configs)
    norm: str = "bn"
    aux: bool | None = None  # default: on for UperNet
    aux_weight: float = 0.4
    # optimisation
    iters: int = 80000
    batch_size: int = 16  # total over all processes
    lr: float = 6e-5
    weight_decay: float = 0.01
    wd_rule: str = "mmcv"  # official: no decay only for names containing 'norm'; bias-norm: the classification rule
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    time_limit_min: float | None = None
    amp: str = "none"  # none, bf16, fp16 (CUDA), auto: xcit.train.engine.resolve_amp
    grad_checkpointing: bool = False
    # augmentation
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    scale: list[int] | None = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    flip: float = 0.5
    # evaluation
    eval_interval: int = 8000
    eval: EvalSettings = field(default_factory=EvalSettings)
    # engine
    device: str = "auto"
    workers: int = 4
    threads: int | None = None
    seed: int = 0
    log_interval: int = 50
    checkpoint_interval: int = 1000
    resume: str | None = None  # a last.pt, or "auto": OUT/last.pt if it exists


def _resolve_dataset(cfg: TrainConfig) -> tuple[DatasetInfo, int, int, bool]:
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


def _loop(loader, sampler):
    epoch = 0
    while True:
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


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
    for n, i in enumerate(indices):
        image, mask = dataset.load(i)
        probs = infer(net, image, mode=settings.mode, scale=settings.scale, crop_size=settings.crop_size,
                      stride=settings.stride, flip=settings.flip, amp_dtype=amp_dtype)
        cm.update(probs.argmax(0), mask)
        if progress and ctx.is_main and (n + 1) % 50 == 0:
            print(f"  evaluated {n + 1}/{len(indices)} images", file=sys.stderr, flush=True)
    cm.all_reduce()
    net.train(was_training)
    return cm.compute()


def _checkpoint(model, cfg: TrainConfig, info: DatasetInfo, extra: dict | None = None) -> dict:
    net = getattr(model, "module", model)
    meta = {"classes": info.classes, "palette": info.palette, "ignore_index": info.ignore_index,
            "reduce_zero_label": info.reduce_zero_label, "eval": asdict(cfg.eval), "train_config": _plain(asdict(cfg))}
    return {"format": FORMAT, "config": segmenter_config(net), "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "meta": meta, **(extra or {})}


def _plain(obj):
    return json.loads(json.dumps(obj))


def train(cfg: TrainConfig) -> dict:
    """Train a segmenter as ``cfg`` says; returns the last evaluation's metrics (also in OUT/summary.json)."""
    ctx = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        dist_utils.cleanup(ctx)


def _train(cfg: TrainConfig, ctx: dist_utils.DistEnv) -> dict:
    start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed + ctx.rank)
    random.seed(cfg.seed + ctx.rank)
    info, num_classes, ignore, rzl = _resolve_dataset(cfg)
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"expected --batch-size divisible by the {ctx.world_size} processes, got {cfg.batch_size}")
    per_proc = cfg.batch_size // ctx.world_size
    amp_dtype = resolve_amp(cfg.amp, ctx.device)

    tr_img, tr_msk = split_dirs(cfg.data, cfg.train_split)
    va_img, va_msk = split_dirs(cfg.data, cfg.val_split)
    transform = TrainTransform(cfg.crop_size, cfg.scale, cfg.ratio_range, cfg.cat_max_ratio, cfg.flip, cfg.photometric,
                               ignore, seed=cfg.seed + ctx.rank)
    train_set = SegmentationFolder(tr_img, tr_msk, num_classes, ignore_index=ignore, reduce_zero_label=rzl, transform=transform)
    val_set = SegmentationFolder(va_img, va_msk, num_classes, ignore_index=ignore, reduce_zero_label=rzl)
    if ctx.distributed:
        sampler = torch.utils.data.DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, replacement=len(train_set) < per_proc,
                                                 num_samples=max(len(train_set), per_proc))
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_proc, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=ctx.device.type == "cuda", worker_init_fn=worker_init, persistent_workers=False,
    )
    if ctx.distributed and math.ceil(len(train_set) / ctx.world_size) < per_proc:
        raise ValueError(f"expected at least {per_proc} training images per process ({ctx.world_size} processes, "
                         f"--batch-size {cfg.batch_size}), got {len(train_set)} images in all")

    drop_path = cfg.drop_path
    if drop_path is None:
        drop_path = MODELS[resolve_name(cfg.backbone).arch].drop_path_rate if cfg.backbone else 0.0
    arch = dict(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    resume_path = resume_state_path(cfg.resume, out)
    if resume_path is not None:  # rebuild exactly the saved model; the backbone init is not needed
        raw = load_file(resume_path, what="segmentation checkpoint")
        model = segmenter_from_config(raw["config"])
        model.load_state_dict(raw["model"])
    else:
        raw = None
        model = build_segmenter(num_classes, cfg.backbone, cfg.pretrained, head=cfg.head, out_indices=cfg.out_indices,
                                drop_path_rate=drop_path, arch={k: v for k, v in arch.items() if v is not None},
                                channels=cfg.channels, norm=cfg.norm, aux=cfg.aux, fpn_channels=cfg.fpn_channels)
    model.backbone.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(ctx.device)
    net = model
    if ctx.distributed:
        model = dist_utils.convert_batchnorm(model, ctx.device)  # SyncBN on GPUs, all-reduce BN on CPU
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    groups = dense_param_groups(model, cfg.weight_decay, cfg.wd_rule)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    time_limit = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    schedule = PolySchedule(cfg.lr, cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.power, cfg.min_lr, time_limit)

    step, elapsed_before, best = 0, 0.0, -1.0
    if raw is not None:
        state = raw["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, elapsed_before, best = state["step"], state["elapsed"], state["best"]
        if ctx.is_main:
            print(f"resumed from {resume_path} at step {step} ({elapsed_before / 60:.1f} min trained)", flush=True)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_plain(asdict(cfg)), indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training {model.head_config['head']} on {len(train_set)} images ({num_classes} classes), "
              f"validating on {len(val_set)}; {n_params / 1e6:.2f} M parameters; {ctx.world_size} process(es) on "
              f"{ctx.device}; up to {cfg.iters} iterations" + (f" or {cfg.time_limit_min} min" if time_limit else ""), flush=True)

    logger = MetricsWriter(out, ctx.is_main, tensorboard=False)

    def elapsed() -> float:
        return elapsed_before + time.time() - start

    def save(name: str) -> None:
        if ctx.is_main:
            extra = {"train_state": {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                                     "elapsed": elapsed(), "best": best}}
            save_state(out / name, _checkpoint(model, cfg, info, extra))

    def run_eval() -> dict:
        nonlocal best
        metrics = evaluate(model, val_set, cfg.eval, ctx, amp_dtype)
        if ctx.is_main:
            logger.write("eval", step, elapsed=round(elapsed(), 1), miou=metrics["miou"], pixel_acc=metrics["pixel_acc"],
                         mean_acc=metrics["mean_acc"], iou=metrics["iou"])
            print(f"[eval] step {step}: mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['pixel_acc']:.2f}  "
                  "IoU " + " ".join(f"{n}={100 * v:.1f}" for n, v in zip(info.classes, metrics["iou"]) if not math.isnan(v))[:400],
                  flush=True)
            if metrics["miou"] > best:
                best = metrics["miou"]
                save_state(out / "best.pt", _checkpoint(model, cfg, info, {"metrics": metrics, "step": step}))
            plot_history(out / "metrics.jsonl", out / "curves.png")
        return metrics

    batches = _loop(loader, sampler)
    net.train()
    window, seen, t_log = [], 0, time.time()
    while step < cfg.iters:
        if dist_utils.broadcast_object(time_limit is not None and elapsed() >= time_limit, ctx):
            if ctx.is_main:
                print(f"time limit of {cfg.time_limit_min} min reached at step {step}", flush=True)
            break
        lr = schedule.lr(step, elapsed())
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, masks = next(batches)
        images, masks = images.to(ctx.device, non_blocking=True), masks.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = net(images)
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=ignore)
        aux_loss = F.cross_entropy(aux.float(), masks, ignore_index=ignore) if aux is not None else None
        total = loss + cfg.aux_weight * aux_loss if aux_loss is not None else loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at step {step}; lower --lr or use --amp none")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        window.append(total.item())
        seen += images.shape[0] * ctx.world_size
        if ctx.is_main and (step % cfg.log_interval == 0 or step == 1):
            rate = seen / max(time.time() - t_log, 1e-9)
            logger.write("train", step, loss=sum(window) / len(window), decode_loss=loss.item(),
                         aux_loss=aux_loss.item() if aux_loss is not None else None, lr=lr,
                         elapsed=round(elapsed(), 1), img_per_s=round(rate, 2))
            eta = (cfg.iters - step) * (time.time() - t_log) / max(len(window), 1)
            if time_limit:
                eta = min(eta, time_limit - elapsed())
            print(f"step {step}/{cfg.iters}  loss {sum(window) / len(window):.4f}  lr {lr:.2e}  {rate:.1f} img/s  "
                  f"elapsed {elapsed() / 60:.1f} min  eta {max(eta, 0) / 60:.1f} min", flush=True)
            window, seen, t_log = [], 0, time.time()
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.iters:
            run_eval()
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            save("last.pt")
    save("last.pt")
    metrics = run_eval()
    if ctx.is_main:
        summary = {"step": step, "elapsed_min": round(elapsed() / 60, 2), "miou": metrics["miou"], "iou": metrics["iou"],
                   "pixel_acc": metrics["pixel_acc"], "mean_acc": metrics["mean_acc"], "classes": info.classes,
                   "best_miou": best}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_metrics(metrics, info.classes), flush=True)
        print(f"finished at step {step} after {elapsed() / 60:.1f} min; checkpoints in {out} (last.pt, best.pt)", flush=True)
    logger.close()
    return metrics


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "validation", settings: EvalSettings | None = None,
                        device: str = "auto", amp: str = "none", num_classes: int | None = None,
                        ignore_index: int | None = None, reduce_zero_label: bool | None = None) -> tuple[dict, list[str]]:
    """Metrics of a segmentation checkpoint on ``data``/``split``; returns (metrics, class names)."""
    ctx = dist_utils.setup(device)
    try:
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
    finally:
        dist_utils.cleanup(ctx)
