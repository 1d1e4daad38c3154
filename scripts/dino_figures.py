"""Class-attention figures of a DINO teacher next to a random-init and a supervised XCiT (docs/figures/dino_*.png).

    python scripts/dino_figures.py runs/dino-fmnist/teacher.pth --supervised runs/fmnist/model.pth

Test images of Fashion-MNIST, the first of each listed class; each model gets the preprocessing saved with it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xcit import create_model
from xcit.data.datasets import build_dataset
from xcit.data.transforms import BatchEvalTransform
from xcit.dino.figures import attention_comparison
from xcit.models import XCiT
from xcit.models.weights import read_metadata
from xcit.viz.attention import forward_with_attention
from xcit.viz.plot import class_attention_figure, save_png, to_display


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="a DINO run's teacher.pth")
    parser.add_argument("--supervised", default=None, help="a supervised model.pth (xcit train)")
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1, 5, 7, 8, 9], help="class indices to show")
    parser.add_argument("--out", default="docs/figures", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model")
    args = parser.parse_args()

    test = build_dataset("fashion-mnist", "val")
    picks = [int((test.targets == c).nonzero()[0]) for c in args.classes]
    data = read_metadata(args.teacher).get("data", {})
    mean, std = tuple(data.get("mean", test.mean)), tuple(data.get("std", test.std))
    images = BatchEvalTransform(test.native_size, crop_pct=1.0, mean=mean, std=std)(test.images[picks])
    teacher = create_model(checkpoint=args.teacher).eval()
    torch.manual_seed(args.seed)
    models: dict[str, XCiT] = {"DINO teacher": teacher, "random init": XCiT(**teacher.arch_config).eval()}
    if args.supervised and Path(args.supervised).is_file():
        sup_data = read_metadata(args.supervised).get("data", {})
        if tuple(sup_data.get("mean", mean)) != mean or tuple(sup_data.get("std", std)) != std:
            raise SystemExit("the supervised model normalises its inputs differently; this script expects the same")
        models["supervised"] = create_model(checkpoint=args.supervised).eval()
    out = Path(args.out)
    captions = [test.classes[int(test.targets[i])] for i in picks]
    fig = attention_comparison(models, images, mean, std, captions=captions)
    print(save_png(fig, out / "dino_attention_compare.png", dpi=110))
    for name, model in models.items():
        with torch.no_grad():
            maps = forward_with_attention(model, images[:1])
        fig = class_attention_figure(to_display(images[0], mean, std), maps.upsampled(tuple(images.shape[-2:]))[0].numpy(),
                                     title=f"{name}: class attention per head ({captions[0]}, test image {picks[0]})")
        print(save_png(fig, out / f"dino_attention_heads_{name.split()[0].lower()}.png", dpi=90))


if __name__ == "__main__":
    main()
