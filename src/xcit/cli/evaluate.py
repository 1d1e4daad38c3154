"""`xcit eval`: top-1 / top-5 / loss of a checkpoint with the official evaluation preprocessing."""
from __future__ import annotations

import argparse
import json
import os

from .config import NON_NEGATIVE, POSITIVE, add_config_option, number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="top-1 / top-5 / loss of a checkpoint on a dataset (resize by crop ratio + centre crop, bicubic)",
        description="Evaluate a checkpoint. Preprocessing comes from the checkpoint when `xcit train` wrote it "
                    "(model.pth), else the paper's: bicubic resize to size / crop_pct, centre crop, crop_pct 1.0.",
    )
    p.add_argument("checkpoint", help="model file: a run's model.pth, an official release .pth, timm or safetensors")
    p.add_argument("--data", default=None,
                   help="fashion-mnist, digits, an IDX folder or a folder with <split>/<class>/ images (default: "
                        "the dataset the checkpoint records it was trained on; required when it records none)")
    p.add_argument("--split", default="val", help="split to evaluate (Fashion-MNIST: val = test = its 10k test images)")
    p.add_argument("--model", default=None, help="architecture name when the checkpoint does not say (official files)")
    p.add_argument("--batch-size", type=POSITIVE, default=256)
    p.add_argument("--img-size", type=POSITIVE, default=None,
                   help="default: the checkpoint's, else 224 (native for small data)")
    p.add_argument("--crop-pct", type=number(float, 0, 1, low_open=True), default=None,
                   help="crop ratio in (0, 1] (default: the checkpoint's, else 1.0)")
    p.add_argument("--in-chans", type=POSITIVE, default=None)
    p.add_argument("--mean", type=number(float), nargs="+", default=None)
    p.add_argument("--std", type=number(float, 0, low_open=True), nargs="+", default=None)
    p.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest"], default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--workers", type=NON_NEGATIVE, default=4, help="loader workers (image folders)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none",
                   help="reduced-precision floats (default none); with --int8 what runs between the int8 products: "
                        "none float32, bf16, auto bf16 where the CPU has bf16 instructions")
    p.add_argument("--int8", action="store_true",
                   help="evaluate the post-training int8 model (xcit.quantize, CPU, needs torchao) calibrated on "
                        "--calibration-images images of the same data's --calibration-split")
    p.add_argument("--calibration-images", type=POSITIVE, default=512, metavar="N", help="with --int8 (default 512)")
    p.add_argument("--calibration-split", default="train", metavar="SPLIT", help="with --int8 (default train)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_config_option(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..classify import evaluate

    metrics = evaluate(
        args.checkpoint, args.data, args.split, model_name=args.model, batch_size=args.batch_size,
        img_size=args.img_size, crop_pct=args.crop_pct, in_chans=args.in_chans, mean=args.mean, std=args.std,
        interpolation=args.interpolation, device=args.device, workers=args.workers, amp=args.amp,
        int8=args.int8, calibration_images=args.calibration_images, calibration_split=args.calibration_split,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank computed the same totals; one prints them
    if args.json:
        print(json.dumps(metrics))
    else:
        kind = f"int8 (calibrated on {metrics['int8']['calibration_images']} images) " if args.int8 else ""
        print(f"{kind}{args.checkpoint} on {metrics['data']} ({args.split}, {metrics['n']} images, {metrics['img_size']}px, "
              f"crop_pct {metrics['crop_pct']}):")
        print(f"  top-1 {metrics['top1']:.2f}%   top-5 {metrics['top5']:.2f}%   loss {metrics['loss']:.4f}")
        if metrics.get("skipped"):
            print(f"  skipped {metrics['skipped']} unreadable image(s)")
    return 0
