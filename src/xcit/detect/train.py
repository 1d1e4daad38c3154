"""Detection training on the run engine (:mod:`xcit.train.run`): what is detection's own is here (COCO
data, the detector, its losses and COCO AP); run folder, logs, checkpoints and the optimiser step
are the engine's, as for every training command."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..train import distributed as dist_utils
from ..train.checkpoint import rng_state, set_rng_state
from ..config import option
from ..train.config import PyramidOptions, merge_with_preset, validate_dense_options
from ..train.metrics import format_duration, progress_bar
from ..train.optim import StepSchedule, dense_param_groups
from ..train.run import (
    OptimStep,
    Run,
    autocast_context,
    default_run_name,
    endless,
    resolve_amp,
    resume_file,
    data_parallel,
    launch,
    set_lr,
    set_threads,
    time_up,
    train_sampler,
)
from .coco import CocoDetection, collate
from .evaluation import evaluate_results, format_metrics, predict_dataset
from .model import build_detector, detector_from_config, detector_state, read_detector_checkpoint

log = logging.getLogger("xcit.train")

KINDS = ("mask_rcnn", "faster_rcnn")


@dataclass
class DetectConfig(PyramidOptions):
    """Every option of ``xcit detect train``. Defaults are the official COCO recipe (REFERENCE 4,
    docs/fidelity.md): Mask R-CNN + FPN(256), AdamW lr 1e-4, wd 0.05 (no decay only for names containing
    'norm'), 36 epochs with the rate divided by 10 after epochs 27 and 33, linear warm-up, 2 images per
    process (16 over the official 8 GPUs), shorter side drawn from 480..800 (longer <= 1333) and the
    DETR-style crop policy, L1 box losses, 1000 proposals kept after NMS in training, aligned RoIAlign
    with adaptive sampling, tested at 800."""

    # --- data
    data: str | None = option(None, "a prepared dataset: ROOT/annotations/{train,val}.json + ROOT/images", "data")
    train_json: str | None = option(None, "COCO file of the training images (default: ROOT/annotations/train.json)", "data")
    val_json: str | None = option(None, "COCO file of the evaluation images (default: ROOT/annotations/val.json if "
                                "present)", "data")
    images: str | None = option(None, "image root for both files (default: ROOT/images for ROOT/annotations/*.json)",
                              "data")
    strict: bool = option(False, "fail on invalid annotations instead of skipping (and counting) them", "data")
    # --- model
    kind: str = option("mask_rcnn", "mask_rcnn (boxes + masks) or faster_rcnn (boxes)", "model", KINDS)
    fpn_channels: int = option(256, "FPN width", "model")
    anchor_sizes: list[int] | None = option(None, "anchor size per level P2..P6 (default 32 64 128 256 512)", "model",
                                          nargs=5)
    box_head_dim: int = option(1024, "box head MLP width", "model")
    mask_head_channels: int = option(256, "mask head conv width", "model")
    rpn_batch_size: int = option(256, "anchors sampled per image for the RPN loss", "model")
    rpn_pre_nms_train: int = option(2000, "proposals kept before NMS per level in training", "model")
    rpn_post_nms_train: int = option(1000, "proposals kept after NMS per image in training (the official configs)",
                                   "model")
    rpn_pre_nms_test: int = option(1000, "proposals kept before NMS per level at test time", "model")
    rpn_post_nms_test: int = option(1000, "proposals kept after NMS per image at test time", "model")
    roi_batch_size: int = option(512, "RoIs sampled per image for the box head", "model")
    detections_per_img: int = option(100, "detections kept per image", "model")
    roi_align: str = option("mmdet", "mmdet (official: aligned, adaptive sampling) or torchvision (aligned=False, "
                          "2 samples)", "model", ("mmdet", "torchvision"))
    box_loss: str = option("l1", "l1 (official) or smooth_l1 (torchvision's, beta 1/9)", "model", ("l1", "smooth_l1"))
    min_size: list[int] | None = option(None, "training shorter sides, one drawn per batch (default 480..800 step 32); "
                                      "0: native size", "model")
    max_size: int = option(1333, "cap on the longer side", "model")
    test_size: int | None = option(None, "test shorter side (default: the largest training size; 0: native)", "model")
    # --- optimisation
    epochs: float = option(36, "training epochs (may be fractional)", "optim")
    iters: int | None = option(None, "training steps (overrides --epochs)", "optim")
    lr: float = option(1e-4, "AdamW learning rate (not scaled with the batch, as mmdet)", "optim")
    weight_decay: float = option(0.05, "AdamW weight decay", "optim")
    lr_steps: list[float] = option([27 / 36, 33 / 36], "fractions of the run where the rate drops", "optim")
    lr_gamma: float = option(0.1, "drop factor at each of --lr-steps", "optim")
    warmup_iters: int = option(500, "linear warm-up steps", "optim")
    warmup_ratio: float = option(0.001, "warm-up starts at this fraction of the rate", "optim")
    # --- augmentation
    hflip: float = option(0.5, "horizontal flip probability", "augment")
    vflip: float = option(0.0, "vertical flip probability (top-down imagery)", "augment")
    rot90: bool = option(False, "random 90-degree turns (top-down imagery)", "augment")
    color_jitter: float = option(0.0, "brightness / contrast / saturation jitter (hue a quarter of it); 0: off",
                               "augment")
    crop_policy: bool = option(True, "the official 3x recipe's DETR-style random crop on half of the images",
                             "augment")
    # --- run (the options shared by every training command are in RunOptions)
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)", "run")
    preset: str | None = option(None, "option preset: coco (the official recipe, the default)", "run")


PRESETS: dict[str, dict[str, Any]] = {"coco": {}}


def resolve_config(values: dict[str, Any] | None = None, **kwargs: Any) -> DetectConfig:
    """A :class:`DetectConfig` from user values: defaults < preset < ``values`` < ``kwargs`` (validated);
    ``data`` fills the COCO file paths of a prepared dataset."""
    merged = merge_with_preset({**(values or {}), **kwargs}, list(fields(DetectConfig)), PRESETS, "", (
        "output", "resume", "data", "train_json", "val_json", "images", "model", "pretrained", "clip_grad",
        "time_budget_min", "iters", "test_size"), what="detection", choose=lambda data: "coco")
    cfg = DetectConfig(**merged)
    if cfg.time_budget_min == 0:
        cfg.time_budget_min = None
    if cfg.data:
        root = Path(cfg.data)
        cfg.train_json = cfg.train_json or str(root / "annotations" / "train.json")
        if cfg.val_json is None and (root / "annotations" / "val.json").is_file():
            cfg.val_json = str(root / "annotations" / "val.json")
    validate(cfg)
    return cfg


def validate(cfg: DetectConfig) -> None:
    """Raise ``ValueError`` saying what was expected for an option that cannot work, before anything runs."""
    if not cfg.train_json:
        raise ValueError("expected --data ROOT (holding annotations/train.json) or --train-json FILE")
    validate_dense_options(cfg)
    for name in ("fpn_channels", "box_head_dim", "mask_head_channels", "rpn_batch_size", "roi_batch_size",
                 "detections_per_img", "max_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} to be an integer >= 1, got {value!r}")
    if not isinstance(cfg.epochs, (int, float)) or not math.isfinite(cfg.epochs) or cfg.epochs <= 0:
        raise ValueError(f"expected epochs > 0, got {cfg.epochs!r}")
    if cfg.iters is not None and cfg.iters < 1:
        raise ValueError(f"expected iters >= 1, got {cfg.iters}")
    if not 0 <= cfg.vflip <= 1:
        raise ValueError(f"expected vflip in [0, 1], got {cfg.vflip}")
    if any(not 0 < s <= 1 for s in cfg.lr_steps):
        raise ValueError(f"expected --lr-steps as fractions of the run in (0, 1], got {cfg.lr_steps}")


def image_root(json_path: Path, images: str | None) -> Path:
    """``images`` if given; else ROOT/images for ROOT/annotations/X.json; else the JSON's folder."""
    if images:
        return Path(images)
    guess = json_path.parent.parent / "images"
    return guess if json_path.parent.name == "annotations" and guess.is_dir() else json_path.parent


def build_from_config(cfg: DetectConfig, num_classes: int) -> torch.nn.Module:
    arch = cfg.arch()
    settings = {k: getattr(cfg, k) for k in (
        "kind", "fpn_channels", "anchor_sizes", "min_size", "max_size", "test_size", "box_head_dim", "mask_head_channels",
        "rpn_batch_size", "rpn_pre_nms_train", "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test",
        "detections_per_img", "roi_align", "box_loss")}
    return build_detector(num_classes, cfg.model, cfg.pretrained, out_indices=cfg.out_indices,
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


def train(config: DetectConfig | dict | None = None, **options: Any) -> dict:
    """Train a detector as ``config`` says; returns the run's result (also in OUTPUT/result.json)."""
    return launch(_train, config, options, DetectConfig, resolve_config, validate)


def _train(cfg: DetectConfig, env: dist_utils.DistEnv) -> dict:
    thread_note = set_threads(cfg.threads, env)
    torch.manual_seed(cfg.seed + env.rank)
    train_json, val_json = Path(cfg.train_json), Path(cfg.val_json) if cfg.val_json else None
    masks = cfg.kind == "mask_rcnn"
    train_set = CocoDetection(train_json, image_root(train_json, cfg.images), masks=masks, train=True, hflip=cfg.hflip,
                              vflip=cfg.vflip, rot90=cfg.rot90, color_jitter=cfg.color_jitter,
                              crop_policy=cfg.crop_policy, strict=cfg.strict, seed=cfg.seed + env.rank)
    val_set = CocoDetection(val_json, image_root(val_json, cfg.images), masks=masks, strict=cfg.strict) if val_json else None
    if val_set is not None and val_set.class_names != train_set.class_names:
        raise ValueError(f"{val_json} has categories {val_set.class_names}, {train_json} {train_set.class_names}")
    amp_dtype = resolve_amp(cfg.amp, env.device)
    sampler = train_sampler(train_set, cfg.batch_size, env, cfg.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=collate, drop_last=True, persistent_workers=cfg.workers > 0)
    steps_per_epoch = max(len(loader), 1)
    total = cfg.iters or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    raw = read_detector_checkpoint(resume_file(cfg.resume, cfg.output)) if cfg.resume else None
    model = detector_from_config(raw["config"]) if raw else build_from_config(cfg, len(train_set.categories))
    if raw:
        model.load_state_dict(raw["model"])
    run = Run.open(cfg, env, default_run_name("detect", cfg.data or train_json.stem, cfg.model or "custom"),
                   resuming=raw is not None, elapsed_before=raw["train_state"]["elapsed"] if raw else 0.0)
    model, net = data_parallel(model.to(env.device), env, cfg.sync_bn)
    groups = dense_param_groups(model, cfg.weight_decay, cfg.wd_rule, exempt_per_channel=cfg.wd_exempt_per_channel)
    step = OptimStep(torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999)), model.parameters(), env, amp_dtype,
                     clip_grad=cfg.clip_grad, clip_mode=cfg.clip_grad_mode,
                     hint="Try a lower --lr, a longer --warmup-iters, --clip-grad or --amp none.")
    time_limit = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    schedule = StepSchedule(cfg.lr, total, cfg.lr_steps, cfg.lr_gamma, cfg.warmup_iters, cfg.warmup_ratio, time_limit)
    best = -1.0
    if raw:
        step.load_state_dict(raw["train_state"])
        best = raw["train_state"]["best"]
        if raw["train_state"].get("rng") is not None and not env.distributed:
            set_rng_state(raw["train_state"]["rng"])
        log.info("resumed from %s at step %d (%.1f min trained)", run.path / "last.pt", step.steps, run.elapsed_before / 60)
    meta = {"classes": train_set.class_names, "category_ids": [c["id"] for c in train_set.categories],
            "train_config": cfg.to_dict()}
    run.save_config(cfg.to_dict(), {"steps": total, "steps_per_epoch": steps_per_epoch, "world_size": env.world_size,
                                    "global_batch": cfg.batch_size * env.world_size, "device": str(env.device)})
    log.info("data: %s", train_set.report.summary())
    if val_set is not None:
        log.info("validation: %s", val_set.report.summary())
    log.info("training %s on %d images (%s), %.2f M parameters, %d process(es) on %s; %d steps of %d images "
             "(--batch-size %d per process)%s%s", cfg.kind, len(train_set), ", ".join(train_set.class_names),
             sum(p.numel() for p in model.parameters()) / 1e6, env.world_size, env.device, total,
             cfg.batch_size * env.world_size, cfg.batch_size, f" or {cfg.time_budget_min:g} min" if time_limit else "",
             f"; {thread_note}" if thread_note else "")

    def state() -> dict:
        return {**detector_state(model, meta),
                "train_state": {**step.state_dict(), "step": step.steps, "elapsed": run.elapsed(), "best": best,
                                "rng": rng_state()}}

    def run_eval() -> dict:
        nonlocal best
        metrics = evaluate(model, val_set, env, amp_dtype)
        flat = flat_metrics(metrics)
        run.write("eval", step.steps, elapsed=round(run.elapsed(), 1), **flat)
        log.info("[eval] step %d\n%s", step.steps, format_metrics(metrics))
        if flat["mask_ap" if masks else "box_ap"] > best:
            best = flat["mask_ap" if masks else "box_ap"]
            run.save("best.pt", {**detector_state(model, meta), "metrics": flat, "step": step.steps})
        run.plot(lambda d: _plot(d, masks))
        return flat

    batches = endless(loader, sampler, step.steps // steps_per_epoch)
    net.train()
    window: dict[str, list[float]] = {}
    seen, t_log = 0, time.time()
    bar = progress_bar(total, "train", cfg.progress and env.is_main)
    bar.update(step.steps)
    while step.steps < total:
        if time_up(run, cfg.time_budget_min):
            log.info("time budget of %g min reached at step %d", cfg.time_budget_min, step.steps)
            break
        lr = schedule.lr(step.steps, run.elapsed())
        set_lr(step.optimizer, lr)
        images, targets = next(batches)
        images = [im.to(env.device, non_blocking=True) for im in images]
        targets = [{k: v.to(env.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast_context(env.device, amp_dtype):
            losses = net(images, targets)
        loss = step(sum(v.float() for v in losses.values()), parts=losses)
        bar.update(1)
        for k, v in {"loss": loss, **{k: float(v.detach()) for k, v in losses.items()}}.items():
            window.setdefault(k, []).append(v)
        seen += len(images) * env.world_size
        if step.steps % cfg.log_every == 0 or step.steps == 1:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            rate = seen / max(time.time() - t_log, 1e-9)
            run.write("train", step.steps, lr=lr, elapsed=round(run.elapsed(), 1), img_per_s=round(rate, 2), **means)
            log.info("step %d/%d  loss %.4f (%s)  lr %.2e  %.2f img/s  %s elapsed", step.steps, total, means["loss"],
                     " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items() if k != "loss"), lr, rate,
                     format_duration(run.elapsed()))
            window, seen, t_log = {}, 0, time.time()
        if val_set is not None and cfg.eval_every and step.steps % cfg.eval_every == 0 and step.steps < total:
            run_eval()
        if cfg.ckpt_every and step.steps % cfg.ckpt_every == 0:
            run.save("last.pt", state)
    bar.close()
    train_time = run.elapsed()
    run.save("last.pt", state)
    result: dict[str, Any] = {"steps": step.steps, "train_min": round(train_time / 60, 2), "images": len(train_set),
                              "skipped_annotations": {"train": dict(train_set.report.skipped)}}
    if val_set is not None:
        t_eval = time.time()
        result.update(metrics=run_eval(), eval_s=round(time.time() - t_eval, 1), best=best)
        result["skipped_annotations"]["val"] = dict(val_set.report.skipped)
    run.plot(lambda d: _plot(d, masks))
    log.info("finished at step %d after %s; %s (last.pt%s)", step.steps, format_duration(train_time), run.path,
             ", best.pt" if val_set is not None else "")
    return run.finish("completed", **result)


def _plot(run_dir: Path, masks: bool) -> Path | None:
    from ..train.plots import plot_history

    return plot_history(run_dir / "metrics.jsonl", run_dir / "curves.png", metric="mask_ap50" if masks else "box_ap50")
