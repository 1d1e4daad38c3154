"""`xcit detect prepare | train | eval | predict`: Mask R-CNN / Faster R-CNN with XCiT backbones on COCO data."""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from .config import add_config_option, require_options
from .unreadable import Unreadable, add_policy

# Help for the training options; every field of xcit.detect.train.DetectConfig becomes --field-name.
_HELP = {
    "train_json": "COCO file of the training images", "val_json": "COCO file of the evaluation images",
    "images": "image root for the file names in both files (default: ROOT/images for ROOT/annotations/*.json)",
    "out": "run folder: last.pt, best.pt, metrics.jsonl, curves.png, summary.json, train.log",
    "kind": "mask_rcnn (boxes + masks) or faster_rcnn (boxes)",
    "backbone": "XCiT architecture, e.g. xcit_tiny_12_p16", "pretrained": "backbone weights: classification or DINO checkpoint, or a name (hf-hub:timm/..., dino_xcit_small_12_p16)",
    "out_indices": "XCA blocks feeding the pyramid (default 3 5 7 11 / 7 11 15 23)",
    "drop_path": "stochastic depth (default: the named model's dense-task rate)",
    "fpn_channels": "FPN width (256)", "anchor_sizes": "anchor size per level P2..P6 (32 64 128 256 512)",
    "min_size": "training shorter sides, one drawn per batch (480..800 step 32); 0: native size",
    "max_size": "cap on the longer side (1333)", "test_size": "test shorter side (default: largest training size; 0: native)",
    "box_head_dim": "box head MLP width (1024)", "mask_head_channels": "mask head conv width (256)",
    "rpn_batch_size": "anchors sampled per image for the RPN loss (256)", "roi_batch_size": "RoIs sampled per image (512)",
    "epochs": "training epochs (36)", "iters": "training steps (overrides --epochs)",
    "batch_size": "images per step over all processes (16)", "lr": "AdamW learning rate (1e-4)", "weight_decay": "(0.05)",
    "lr_steps": "fractions of the run where the rate drops (27/36 33/36)", "lr_gamma": "drop factor (0.1)",
    "warmup_iters": "linear warm-up steps (500)", "time_limit_min": "stop after this many minutes (the step schedule then follows time)",
    "amp": "mixed precision: none, bf16, fp16 (CUDA), auto", "vflip": "vertical flip probability (top-down imagery)",
    "rot90": "random 90-degree turns (top-down imagery)",
    "color_jitter": "brightness / contrast / saturation jitter (hue a quarter of it); 0: off", "eval_interval": "evaluate every N steps (0: at the end only)",
    "strict": "fail on invalid annotations instead of skipping them", "resume": "a last.pt to continue from, or 'auto'",
    "rpn_post_nms_train": "proposals kept after NMS per image in training (1000, the official configs)",
    "roi_align": "mmdet (official: aligned, adaptive sampling) or torchvision (aligned=False, 2 samples)",
    "box_loss": "l1 (official) or smooth_l1 (torchvision, beta 1/9)",
    "wd_rule": "mmcv (official: no decay only for names containing 'norm') or bias-norm (biases and 1-d exempt)",
    "wd_exempt_per_channel": "with --wd-rule bias-norm: also exempt XCA temperatures",
    "crop_policy": "the official 3x recipe's DETR-style random crop on half of the images (--no-crop-policy: none)",
}
_CHOICES = {"kind": ["mask_rcnn", "faster_rcnn"], "roi_align": ["mmdet", "torchvision"],
            "box_loss": ["l1", "smooth_l1"], "wd_rule": ["mmcv", "bias-norm"]}


def _add_dataclass_options(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = str(hints[f.name])
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        help_text = _HELP.get(f.name, f"(default {default})" if default not in (None, "") else None)
        flag = "--" + f.name.replace("_", "-")
        if hint.startswith("bool") or isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif "list" in hint:
            p.add_argument(flag, type=float if "float" in hint else int, nargs="+", default=None, help=help_text)
        else:
            kind = int if "int" in hint and "float" not in hint else float if "float" in hint else str
            p.add_argument(flag, type=kind, default=None, help=help_text,
                           choices=_CHOICES.get(f.name))


def register(sub: argparse._SubParsersAction) -> None:
    det = sub.add_parser("detect", help="object detection and instance segmentation (Mask R-CNN / Faster R-CNN)",
                         description="Detection with XCiT backbones on torchvision's detectors. See docs/detection.md.")
    tasks = det.add_subparsers(dest="detect_command", required=True, metavar="ACTION")

    p = tasks.add_parser("prepare", help="write a real dataset (trees, nuclei) as a COCO-format dataset")
    p.add_argument("dataset", choices=["trees", "nuclei"])
    p.add_argument("--out", required=True, help="output folder: images/{train,val}, annotations/{train,val}.json, SOURCE.txt")
    p.add_argument("--source", default=None, metavar="PATH", help="the package's .whl file or unpacked folder (default: installed)")
    p.add_argument("--in-domain", action="store_true",
                   help="trees: also train on three quadrants of OSBS_029 and hold out its bottom-right one (a same-site check)")
    add_config_option(p)
    p.set_defaults(func=run_prepare)

    from ..detect.train import DetectConfig

    p = tasks.add_parser("train", help="train a detector (defaults: the paper's COCO Mask R-CNN recipe)",
                         description="Train Mask R-CNN or Faster R-CNN with an XCiT + FPN backbone on a COCO-format "
                                     "dataset. Distributed with torchrun. Defaults: AdamW lr 1e-4, wd 0.05, 36 epochs "
                                     "(steps at 27 and 33), warm-up, batch 16, multi-scale 480..800.")
    p.add_argument("--data", default=None, metavar="ROOT", help="a prepared dataset: ROOT/annotations/{train,val}.json + ROOT/images")
    _add_dataclass_options(p, DetectConfig)
    add_config_option(p)
    p.set_defaults(func=run_train)

    p = tasks.add_parser("eval", help="COCO box (and mask) AP of a checkpoint on a COCO file")
    p.add_argument("--checkpoint", default=None, help="detection checkpoint (best.pt / last.pt), an official COCO file or its name (maskrcnn_xcit_tiny_12_p16)")
    p.add_argument("--json", dest="coco_json", default=None, metavar="FILE", help="COCO file of the images to evaluate")
    p.add_argument("--data", default=None, metavar="ROOT", help="a prepared dataset (evaluates ROOT/annotations/val.json)")
    p.add_argument("--images", default=None, help="image root (default: ROOT/images, else the JSON's folder)")
    _test_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--output", default=None, metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--overlays", default=None, metavar="DIR", help="also write an overlay PNG per image here")
    add_config_option(p)
    p.set_defaults(func=run_eval)

    p = tasks.add_parser("predict", help="PNG overlays and a COCO-format JSON of the detections in images or folders")
    add_policy(p, ', and under "unreadable" in predictions.json')
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files and/or folders")
    p.add_argument("--checkpoint", default=None, help="detection checkpoint, an official COCO file or its name (maskrcnn_xcit_tiny_12_p16)")
    p.add_argument("--out", default="detections", help="output folder (NAME_overlay.png, predictions.json)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    _test_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    add_config_option(p)
    p.set_defaults(func=run_predict)


def _test_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-size", type=int, default=None,
                   help="shorter side at test time (default: the checkpoint's; 0: each image at its own resolution)")
    p.add_argument("--max-size", type=int, default=None, help="cap on the longer side (default: the checkpoint's)")
    p.add_argument("--detections", type=int, default=None, help="detections kept per image (default: the checkpoint's, 100)")


def run_prepare(args: argparse.Namespace) -> int:
    from ..detect.prepare import prepare

    if args.in_domain and args.dataset != "trees":
        raise ValueError("expected --in-domain only with trees (nuclei always holds out one quadrant of its image)")
    paths = prepare(args.dataset, args.out, args.source, **({"in_domain": True} if args.in_domain else {}))
    print(f"wrote {args.dataset} to {args.out}: {paths['train']} (training), {paths['val']} (held out); see SOURCE.txt")
    return 0


def train_config_from_args(args: argparse.Namespace):
    """A :class:`DetectConfig`: the defaults overridden by every option given; --data fills the file paths."""
    from ..detect.train import DetectConfig

    cfg = DetectConfig()
    for f in fields(DetectConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    if getattr(args, "data", None):
        root = Path(args.data)
        cfg.train_json = cfg.train_json or str(root / "annotations" / "train.json")
        if cfg.val_json is None and (root / "annotations" / "val.json").is_file():
            cfg.val_json = str(root / "annotations" / "val.json")
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from ..detect.train import train

    cfg = train_config_from_args(args)
    if cfg.backbone is None and cfg.pretrained is None and cfg.embed_dim is None:
        raise ValueError("expected --backbone NAME, --pretrained CKPT or a custom shape (--patch-size/--embed-dim/--depth/--num-heads)")
    train(cfg)
    return 0


def _load(args: argparse.Namespace):
    import torch

    from ..detect.model import load_detector, set_test_size
    from ..train.distributed import pick_device

    require_options(args, "checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_detector(args.checkpoint)
    if args.test_size is not None or args.max_size is not None:
        set_test_size(model, model.transform.test_size if args.test_size is None else args.test_size, args.max_size)
    if args.detections is not None:
        model.roi_heads.detections_per_img = args.detections
    device = pick_device(args.device)
    return model.to(device), meta, device


def run_eval(args: argparse.Namespace) -> int:
    from ..detect.coco import CocoDetection
    from ..detect.evaluation import evaluate_results, format_metrics, predict_dataset
    from ..detect.train import flat_metrics, image_root

    if args.coco_json is None and args.data:
        args.coco_json = str(Path(args.data) / "annotations" / "val.json")
    require_options(args, "coco_json")
    model, meta, device = _load(args)
    masks = model.roi_heads.has_mask()
    path = Path(args.coco_json)
    dataset = CocoDetection(path, image_root(path, args.images), masks=masks, strict=args.strict)
    if dataset.class_names != meta.get("classes", dataset.class_names):
        raise ValueError(f"{path} has categories {dataset.class_names}, the checkpoint was trained on {meta['classes']}")
    results = predict_dataset(model, dataset, device, progress=True)
    metrics = evaluate_results(dataset, results, masks)
    print(f"{path}: {dataset.report.summary()}")
    print(format_metrics(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps({"json": str(path), **flat_metrics(metrics)}, indent=2))
    if args.overlays:
        from ..detect.predict import predict_files

        predict_files(model, [dataset.root / im["file_name"] for im in dataset.images], args.overlays,
                      meta.get("classes", []), meta.get("category_ids", []), device)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..detect.predict import predict_files
    from .predict import input_images

    require_options(args, "checkpoint", "inputs")
    files = [Path(f) for f in input_images(args.inputs)]
    model, meta, device = _load(args)
    n = model.roi_heads.box_predictor.cls_score.out_features - 1
    classes = meta.get("classes") or [f"class{i}" for i in range(1, n + 1)]
    unreadable = Unreadable("detect predict")
    summary = predict_files(model, files, args.out, classes, meta.get("category_ids") or list(range(1, n + 1)), device,
                            args.score_thresh, on_error=unreadable)
    print(f"wrote {summary['images']} overlays and {args.out}/predictions.json ({summary['detections']} detections)")
    return unreadable.finish(len(files))
