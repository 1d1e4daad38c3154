"""`xcit dino` (DINO pretraining), `xcit knn` (weighted k-NN) and `xcit linear` (linear probe).

``xcit dino`` alone pretrains on Fashion-MNIST with its preset; ``--data /imagenet`` takes DINO's
ImageNet recipe; ``torchrun --nproc_per_node=8 -m xcit dino ...`` runs it data-parallel. Every
option of :class:`xcit.dino.DinoConfig` is a flag; ``--config configs/dino/....yaml`` sets them.
"""
from __future__ import annotations

import argparse
import json
import os

from .config import NON_NEGATIVE, POSITIVE, add_config_option, add_overwrite_option, number
from .train import TITLES, add_field_options, print_config, training_options



def register(sub: argparse._SubParsersAction) -> None:
    _register_dino(sub)
    for name in ("knn", "linear"):
        _register_eval(sub, name)


def _register_dino(sub: argparse._SubParsersAction) -> None:
    from ..dino.config import PRESETS, config_fields

    p = sub.add_parser(
        "dino", help="self-supervised DINO pretraining of an XCiT (Fashion-MNIST preset by default; torchrun)",
        description="DINO pretraining (student/teacher, multi-crop, centring, EMA teacher). Defaults are DINO's "
                    f"ImageNet recipe; a preset ({', '.join(PRESETS)}, chosen by the dataset unless --preset) replaces "
                    "some, a --config YAML overrides the preset and the command line overrides both. The run "
                    "directory gets teacher.pth, a plain XCiT checkpoint (xcit.create_model(checkpoint=...)).",
    )
    add_field_options(p, config_fields(), {**TITLES, "augment": "multi-crop augmentation"})
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    add_config_option(p)
    p.set_defaults(func=run_dino)


def run_dino(args: argparse.Namespace) -> int:
    from ..dino import pretrain, resolve_config

    cfg = resolve_config(training_options(args))
    if args.print_config:
        print_config(cfg)
        return 0
    result = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"teacher backbone: {result.teacher_path}  ({result.epochs:.2f} epochs, {result.steps} steps, "
              f"{result.wall_time / 60:.1f} min)")
    return 0


def _register_eval(sub: argparse._SubParsersAction, name: str) -> None:
    knn = name == "knn"
    p = sub.add_parser(
        name,
        help=("weighted k-NN (k=20, T=0.07) on frozen L2-normalised features: top-1 / top-5" if knn else
              "linear probe on frozen features (DINO's protocol by default): top-1 / top-5"),
        description=("DINO's k-NN evaluation: features of the training split vote (weight exp(cos/T)) for each test "
                     "image." if knn else "Train a linear classifier on frozen features of the training split and test "
                     "it: DINO's eval_linear.py protocol (augmented crops through the frozen network every epoch, SGD "
                     "lr 0.001 x batch / 256, 100 epochs) or --protocol precomputed (the fast probe on standardised, "
                     "non-augmented features computed once; its numbers are not DINO's).") +
                    " Test images: resize to size / crop-pct and centre crop (DINO: 0.875). Features: a checkpoint's "
                    "cls token (any XCiT weights: a DINO teacher.pth or last.pt, a supervised model.pth), its "
                    "architecture randomly initialised (--random-init), or raw pixels (--pixels). Runs data-parallel "
                    "under torchrun.",
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
    if knn:
        p.add_argument("--k", type=POSITIVE, default=20, help="neighbours")
        p.add_argument("--temperature", type=number(float, 0, low_open=True), default=0.07,
                       help="vote weight exp(cos / T), T > 0")
    else:
        p.add_argument("--protocol", choices=["dino", "precomputed"], default="dino",
                       help="dino: DINO's eval_linear.py (default); precomputed: the fast probe on features "
                            "computed once")
        p.add_argument("--epochs", type=POSITIVE, default=100, help="probe epochs (100, DINO's)")
        p.add_argument("--lr", type=number(float, 0, low_open=True), default=None,
                       help="SGD peak lr, momentum 0.9, cosine: dino 0.001 per 256 images (scaled by the global "
                            "batch), precomputed 0.1")
        p.add_argument("--weight-decay", type=number(float, 0), default=0.0,
                       help="precomputed only (DINO applies none)")
        p.add_argument("--probe-batch-size", type=POSITIVE, default=None,
                       help="dino: images per process and step (128); precomputed: features per step (256)")
        p.add_argument("--output", default=None,
                       help="save backbone + probe as an XCiT classifier (.pth); never the input checkpoint itself")
        add_overwrite_option(p, "replace an existing --output file (never the input checkpoint)")
    p.add_argument("--crop-pct", type=number(float, 0, 1, low_open=True), default=None,
                   help="test (and k-NN) preprocessing: resize to size / crop-pct, centre crop (default: DINO's 0.875 "
                        "for image folders; 1.0 for Fashion-MNIST, digits and IDX data)")
    p.add_argument("--batch-size", type=POSITIVE, default=500, help="images per forward pass when embedding")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--workers", type=NON_NEGATIVE, default=4, help="loader workers (class folders)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init (and of the probe)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_option(p)
    p.set_defaults(func=run_feature_eval)


def run_feature_eval(args: argparse.Namespace) -> int:
    import torch

    from ..dino import knn_evaluate, linear_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(pixels=args.pixels, random_init=args.random_init, train_split=args.train_split,
                  test_split=args.test_split, pool=args.pool, batch_size=args.batch_size, device=args.device,
                  workers=args.workers, amp=args.amp, seed=args.seed, crop_pct=args.crop_pct)
    if args.command == "knn":
        result = knn_evaluate(args.checkpoint, args.data, k=args.k, temperature=args.temperature, **common)
        what = f"k-NN (k={args.k}, T={args.temperature})"
    else:
        result = linear_probe(args.checkpoint, args.data, protocol=args.protocol, epochs=args.epochs, lr=args.lr,
                              weight_decay=args.weight_decay, probe_batch_size=args.probe_batch_size,
                              output=args.output, overwrite=args.overwrite, **common)
        what = f"linear probe ({args.protocol} protocol, {args.epochs} epochs)"
    report = json.dumps(result) if args.json else (
        f"{what} on {result['data']} {result['split']} ({result['n']} images, {result['n_train']} training features "
        f"of dim {result['dim']}), features: {result['features']}\n"
        f"  top-1 {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   ({result['seconds']:.1f} s)")
    if int(os.environ.get("RANK", "0")) == 0:  # every rank holds the same totals; one prints them
        print(report)
    return 0
