"""`xcit dino` (DINO pretraining), `xcit knn` (weighted k-NN) and `xcit linear` (linear probe, a training run).

``xcit dino`` alone pretrains on Fashion-MNIST with its preset; ``--data /imagenet`` takes DINO's
ImageNet recipe; ``torchrun --nproc_per_node=8 -m xcit dino ...`` runs it data-parallel. Every
option of :class:`xcit.dino.DinoConfig` is a flag; ``--config configs/dino/....yaml`` sets them.
"""
from __future__ import annotations

import argparse
import json
import os

from .config import NON_NEGATIVE, POSITIVE, add_config_option, number
from .options import add_training_command


def register(sub: argparse._SubParsersAction) -> None:
    _register_dino(sub)
    _register_knn(sub)
    _register_linear(sub)


def _register_dino(sub: argparse._SubParsersAction) -> None:
    from ..dino.config import PRESETS

    add_training_command(
        sub, "dino", "xcit.dino",
        help="self-supervised DINO pretraining of an XCiT (Fashion-MNIST preset by default; torchrun)",
        description="DINO pretraining (student/teacher, multi-crop, centring, EMA teacher). Defaults are DINO's "
                    f"ImageNet recipe; a preset ({', '.join(PRESETS)}, chosen by the dataset unless --preset) replaces "
                    "some, --config YAML files override the preset and the command line overrides them all. The run "
                    "folder gets teacher.pth, a plain XCiT checkpoint (xcit.create_model(checkpoint=...)).",
        titles={"augment": "multi-crop augmentation"})


def _register_linear(sub: argparse._SubParsersAction) -> None:
    p = add_training_command(
        sub, "linear", "xcit.dino.linear",
        help="linear probe on frozen features (DINO's protocol by default), a training run: top-1 / top-5",
        description="Train a linear classifier on frozen features of the training split and test it: DINO's "
                    "eval_linear.py protocol (augmented crops through the frozen network every step, SGD lr 0.001 x "
                    "global batch / 256, 100 epochs) or --protocol precomputed (the fast probe on standardised, "
                    "non-augmented features computed once; its numbers are not DINO's). Test images: resize to size / "
                    "crop-pct and centre crop (DINO: 0.875). Features: a checkpoint's cls token (any XCiT weights), "
                    "its architecture randomly initialised (--random-init), or raw pixels (--pixels). A training run like "
                    "every other (run folder, --resume, torchrun); its model.pth is the probe as an XCiT classifier.")
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, help="XCiT weights (or --checkpoint)")


def _register_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "knn", help="weighted k-NN (k=20, T=0.07) on frozen L2-normalised features: top-1 / top-5",
        description="DINO's k-NN evaluation: features of the training split vote (weight exp(cos/T)) for each test "
                    "image. Test images: resize to size / crop-pct and centre crop (DINO: 0.875). Features: a "
                    "checkpoint's cls token (any XCiT weights: a DINO teacher.pth or last.pt, a supervised model.pth), "
                    "its architecture randomly initialised (--random-init), or raw pixels (--pixels). Runs "
                    "data-parallel under torchrun.",
    )
    p.add_argument("checkpoint", nargs="?", default=None, help="XCiT weights (omit with --pixels)")
    p.add_argument("--data", default=None,
                   help="fashion-mnist, digits, an IDX folder or class folders (default: the dataset the checkpoint "
                        "records it was trained on)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="val", help="Fashion-MNIST: val = its 10k test images")
    p.add_argument("--pixels", action="store_true", help="use the normalised pixels as features (baseline)")
    p.add_argument("--random-init", action="store_true", help="the checkpoint's architecture, randomly initialised")
    p.add_argument("--pool", choices=["cls", "avg", "cls+avg"], default="cls",
                   help="feature: cls token after the final norm (DINO's), mean patch token, or both")
    p.add_argument("--k", type=POSITIVE, default=20, help="neighbours")
    p.add_argument("--temperature", type=number(float, 0, low_open=True), default=0.07,
                   help="vote weight exp(cos / T), T > 0")
    p.add_argument("--crop-pct", type=number(float, 0, 1, low_open=True), default=None,
                   help="preprocessing: resize to size / crop-pct, centre crop (default: DINO's 0.875 for image "
                        "folders; 1.0 for Fashion-MNIST, digits and IDX data)")
    p.add_argument("--batch-size", type=POSITIVE, default=500, help="images per forward pass when embedding")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--workers", type=NON_NEGATIVE, default=4, help="loader workers (class folders)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_option(p)
    p.set_defaults(func=run_knn)


def run_knn(args: argparse.Namespace) -> int:
    import torch

    from ..dino import knn_evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    result = knn_evaluate(args.checkpoint, args.data, k=args.k, temperature=args.temperature, pixels=args.pixels,
                          random_init=args.random_init, train_split=args.train_split, test_split=args.test_split,
                          pool=args.pool, batch_size=args.batch_size, device=args.device, workers=args.workers,
                          amp=args.amp, seed=args.seed, crop_pct=args.crop_pct)
    report = json.dumps(result) if args.json else (
        f"k-NN (k={args.k}, T={args.temperature}) on {result['data']} {result['split']} ({result['n']} images, "
        f"{result['n_train']} training features of dim {result['dim']}), features: {result['features']}\n"
        f"  top-1 {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   ({result['seconds']:.1f} s)")
    if int(os.environ.get("RANK", "0")) == 0:  # every rank holds the same totals; one prints them
        print(report)
    return 0
