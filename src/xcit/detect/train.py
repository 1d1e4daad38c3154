"""Detection training on the shared engine: torchrun processes, AMP, atomic resumable checkpoints,
JSON Lines metrics, progress bars and curves; COCO AP evaluation during and after training."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..train import distributed as dist_utils
from ..train.checkpoint import resume_path, rng_state, save_state, set_rng_state
from ..train.engine import autocast_context, resolve_amp
from ..train.metrics import MetricsWriter, close_logging, format_duration, progress_bar, setup_logging
from ..train.optim import StepSchedule, dense_param_groups
from .coco import CocoDetection, collate
from .evaluation import evaluate_results, format_metrics, predict_dataset
from .model import build_detector, detector_from_config, detector_state, read_detector_checkpoint

log = logging.getLogger("xcit.train")


@dataclass
class DetectConfig:
    """Defaults are the official COCO recipe (REFERENCE 4, docs/fidelity.md): Mask R-CNN + FPN(256), AdamW
    lr 1e-4, wd 0.05 (no decay only for names containing 'norm'), 36 epochs with the rate divided by 10
    after epochs 27 and 33, linear warm-up, 16 images per step, shorter side drawn from 480..800 (longer
    <= 1333) and the DETR-style crop policy, L1 box losses, 1000 proposals kept after NMS in training,
    aligned RoIAlign with adaptive sampling, tested at 800."""

    train_json: str = ""
    val_json: str | None = None
    images: str | None = None  # image root for both files (default: ROOT/images for ROOT/annotations/*.json)
    out: str = "runs/detect"
    kind: str = "mask_rcnn"
    # backbone
    backbone: str | None = None
    pretrained: str | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    out_indices: list[int] | None = None
    drop_path: float | None = None  # default: the named model's dense-task rate
    # detector
    fpn_channels: int = 256
    anchor_sizes: list[int] | None = None  # default 32 64 128 256 512
    min_size: list[int] | None = None  # training shorter sides; default 480..800 step 32
    max_size: int = 1333
    test_size: int | None = None  # default: the largest training size; 0: native
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    rpn_batch_size: int = 256
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    roi_batch_size: int = 512
    detections_per_img: int = 100
    roi_align: str = "mmdet"  # mmcv's aligned RoIAlign with adaptive sampling; torchvision: aligned=False, 2 samples
    box_loss: str = "l1"  # the official L1 box losses; smooth_l1: torchvision's (beta 1/9)
    # optimisation
    epochs: float = 36
    iters: int | None = None  # overrides epochs
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    wd_rule: str = "mmcv"  # no decay only for names containing 'norm' (official); bias-norm: the classification rule
    wd_exempt_per_channel: bool = False  # with bias-norm: also exempt XCA temperatures
    lr_steps: list[float] = field(default_factory=lambda: [27 / 36, 33 / 36])  # fractions of the run
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    clip_grad: float | None = None
    time_limit_min: float | None = None
    amp: str = "none"  # none, bf16, fp16, auto
    # augmentation
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: bool = False
    color_jitter: float = 0.0
    crop_policy: bool = True  # the official 3x recipe's DETR-style crop on half of the images
    # engine
    eval_interval: int = 0  # 0: only at the end
    checkpoint_interval: int = 500
    log_interval: int = 20
    device: str = "auto"
    workers: int = 2
    threads: int | None = None
    seed: int = 0
    strict: bool = False
    resume: str | None = None  # a last.pt, or "auto"


def data_paths(cfg: DetectConfig) -> tuple[Path, Path | None, Path]:
    """(train JSON, val JSON or None, image root) with the defaults of the prepared layout."""
    if not cfg.train_json:
        raise ValueError("expected --train-json FILE (or --data ROOT holding annotations/train.json)")
    train = Path(cfg.train_json)
    val = Path(cfg.val_json) if cfg.val_json else None
    return train, val, image_root(train, cfg.images)


def image_root(json_path: Path, images: str | None) -> Path:
    """``images`` if given; else ROOT/images for ROOT/annotations/X.json; else the JSON's folder."""
    if images:
        return Path(images)
    guess = json_path.parent.parent / "images"
    return guess if json_path.parent.name == "annotations" and guess.is_dir() else json_path.parent


def build_from_config(cfg: DetectConfig, num_classes: int) -> torch.nn.Module:
    arch = {k: getattr(cfg, k) for k in ("patch_size", "embed_dim", "depth", "num_heads") if getattr(cfg, k) is not None}
    settings = {k: getattr(cfg, k) for k in (
        "kind", "fpn_channels", "anchor_sizes", "min_size", "max_size", "test_size", "box_head_dim", "mask_head_channels",
        "rpn_batch_size", "rpn_pre_nms_train", "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test",
        "detections_per_img", "roi_align", "box_loss")}
    return build_detector(num_classes, cfg.backbone, cfg.pretrained, out_indices=cfg.out_indices,
                          drop_path_rate=cfg.drop_path, arch=arch, roi_batch_size=cfg.roi_batch_size, **settings)


def evaluate(model, dataset: CocoDetection, ctx: dist_utils.DistEnv, amp_dtype=None, progress: bool = False) -> dict:
    """COCO metrics of ``model`` on ``dataset``; images are shared out over processes, rank 0 scores."""
    results = predict_dataset(model, dataset, ctx.device, range(ctx.rank, len(dataset), ctx.world_size), amp_dtype, progress)
    if ctx.distributed:
        gathered: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    net = getattr(model, "module", model)
    return evaluate_results(dataset, results, net.roi_heads.has_mask())


def flat_metrics(metrics: dict) -> dict[str, float]:
    """{"box_ap": .., "box_ap50": .., "mask_ap": ..} for logs and summaries."""
    prefix = {"bbox": "box", "segm": "mask"}
    return {f"{prefix[k]}_{name.lower()}": v for k, m in metrics.items() for name, v in m.items()}


def train(cfg: DetectConfig) -> dict:
    """Train a detector as ``cfg`` says; returns the final metrics (also in OUT/summary.json)."""
    ctx = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        dist_utils.cleanup(ctx)
        close_logging()


def _train(cfg: DetectConfig, ctx: dist_utils.DistEnv) -> dict:
    start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier(ctx)
    setup_logging(out, ctx.is_main)
    torch.manual_seed(cfg.seed + ctx.rank)
    train_json, val_json, root = data_paths(cfg)
    masks = cfg.kind == "mask_rcnn"
    train_set = CocoDetection(train_json, root, masks=masks, train=True, hflip=cfg.hflip, vflip=cfg.vflip,
                              rot90=cfg.rot90, color_jitter=cfg.color_jitter, crop_policy=cfg.crop_policy,
                              strict=cfg.strict, seed=cfg.seed + ctx.rank)
    val_set = CocoDetection(val_json, image_root(val_json, cfg.images), masks=masks, strict=cfg.strict) if val_json else None
    if val_set is not None and val_set.class_names != train_set.class_names:
        raise ValueError(f"{val_json} has categories {val_set.class_names}, {train_json} {train_set.class_names}")
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"expected --batch-size divisible by the {ctx.world_size} processes, got {cfg.batch_size}")
    per_proc = cfg.batch_size // ctx.world_size
    amp_dtype = resolve_amp(cfg.amp, ctx.device)
    if ctx.distributed:
        sampler = torch.utils.data.DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, replacement=len(train_set) < per_proc,
                                                 num_samples=max(len(train_set), per_proc))
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_proc, sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=collate, drop_last=True, persistent_workers=cfg.workers > 0)
    steps_per_epoch = max(len(loader), 1)
    total = cfg.iters or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    resume = resume_path(cfg.resume, out)
    raw = read_detector_checkpoint(resume) if resume else None
    model = detector_from_config(raw["config"]) if raw else build_from_config(cfg, len(train_set.categories))
    if raw:
        model.load_state_dict(raw["model"])
    model.to(ctx.device)
    net = model
    if ctx.distributed:
        model = dist_utils.convert_batchnorm(model, ctx.device)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    groups = dense_param_groups(model, cfg.weight_decay, cfg.wd_rule, exempt_per_channel=cfg.wd_exempt_per_channel)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    time_limit = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    schedule = StepSchedule(cfg.lr, total, cfg.lr_steps, cfg.lr_gamma, cfg.warmup_iters, cfg.warmup_ratio, time_limit)
    step, elapsed_before, best = 0, 0.0, -1.0
    if raw:
        state = raw["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, elapsed_before, best = state["step"], state["elapsed"], state["best"]
        if state.get("rng") is not None and not ctx.distributed:
            set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (%.1f min trained)", resume, step, elapsed_before / 60)
    meta = {"classes": train_set.class_names, "category_ids": [c["id"] for c in train_set.categories],
            "train_config": json.loads(json.dumps(asdict(cfg)))}
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps(meta["train_config"], indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        log.info("data: %s", train_set.report.summary())
        if val_set is not None:
            log.info("validation: %s", val_set.report.summary())
        log.info("training %s on %d images (%s), %.2f M parameters, %d process(es) on %s; %d steps of %d images%s",
                 cfg.kind, len(train_set), ", ".join(train_set.class_names), n_params / 1e6, ctx.world_size, ctx.device,
                 total, cfg.batch_size, f" or {cfg.time_limit_min:g} min" if time_limit else "")
    writer = MetricsWriter(out, ctx.is_main, tensorboard=False)

    def elapsed() -> float:
        return elapsed_before + time.time() - start

    def save(name: str, extra: dict | None = None) -> None:
        if ctx.is_main:
            train_state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                           "elapsed": elapsed(), "best": best, "rng": rng_state()}
            save_state(out / name, {**detector_state(model, meta), "train_state": train_state, **(extra or {})})

    def run_eval() -> dict:
        nonlocal best
        metrics = evaluate(model, val_set, ctx, amp_dtype)
        flat = flat_metrics(metrics)
        if ctx.is_main:
            writer.write("eval", step, elapsed=round(elapsed(), 1), **flat)
            log.info("[eval] step %d\n%s", step, format_metrics(metrics))
            key = "mask_ap" if masks else "box_ap"
            if flat[key] > best:
                best = flat[key]
                save_state(out / "best.pt", {**detector_state(model, meta), "metrics": flat, "step": step})
            _plot(out, masks)
        return metrics

    def batches():
        epoch = step // steps_per_epoch
        while True:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    data = batches()
    net.train()
    window: dict[str, list[float]] = {}
    seen, t_log = 0, time.time()
    bar = progress_bar(total, "train", ctx.is_main)
    bar.update(step)
    while step < total:
        if dist_utils.broadcast_object(time_limit is not None and elapsed() >= time_limit, ctx):
            log.info("time limit of %g min reached at step %d", cfg.time_limit_min, step)
            break
        lr = schedule.lr(step, elapsed())
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        images, targets = next(data)
        images = [im.to(ctx.device, non_blocking=True) for im in images]
        targets = [{k: v.to(ctx.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast_context(ctx.device, amp_dtype):
            losses = net(images, targets)
        loss = sum(v.float() for v in losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} ({ {k: v.item() for k, v in losses.items()} }); "
                                     "lower --lr, raise --warmup-iters or use --amp none")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update(1)
        for k, v in {"loss": loss, **losses}.items():
            window.setdefault(k, []).append(v.item())
        seen += len(images) * ctx.world_size
        if ctx.is_main and (step % cfg.log_interval == 0 or step == 1):
            means = {k: sum(v) / len(v) for k, v in window.items()}
            rate = seen / max(time.time() - t_log, 1e-9)
            writer.write("train", step, lr=lr, elapsed=round(elapsed(), 1), img_per_s=round(rate, 2), **means)
            log.info("step %d/%d  loss %.4f (%s)  lr %.2e  %.2f img/s  %s elapsed", step, total, means["loss"],
                     " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items() if k != "loss"), lr, rate,
                     format_duration(elapsed()))
            window, seen, t_log = {}, 0, time.time()
        if val_set is not None and cfg.eval_interval and step % cfg.eval_interval == 0 and step < total:
            run_eval()
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            save("last.pt")
    bar.close()
    train_time = elapsed()
    save("last.pt")
    summary: dict[str, Any] = {"step": step, "train_min": round(train_time / 60, 2), "images": len(train_set)}
    if val_set is not None:
        t_eval = time.time()
        metrics = run_eval()
        summary.update(flat_metrics(metrics), eval_s=round(time.time() - t_eval, 1), best=best)
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _plot(out, masks)
        log.info("finished at step %d after %s; %s (last.pt%s)", step, format_duration(train_time), out,
                 ", best.pt" if val_set is not None else "")
    writer.close()
    return summary


def _plot(out: Path, masks: bool) -> None:
    from ..train.plots import plot_history

    try:
        plot_history(out / "metrics.jsonl", out / "curves.png", metric="mask_ap50" if masks else "box_ap50")
    except Exception as err:  # noqa: BLE001 - a figure is not worth failing a run for
        log.warning("could not draw curves: %s", err)
