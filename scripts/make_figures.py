#!/usr/bin/env python
"""Regenerate the attention figures of docs/attention_export_predict.md (and the README).

    python scripts/make_figures.py                                   # photos, random-init xcit_nano_12_p16
    python scripts/make_figures.py --checkpoint runs/fmnist/best.pth # + Fashion-MNIST test images

Everything goes through the library calls behind the ``xcit attention`` / ``xcit predict`` commands
(:func:`xcit.viz.pipeline.render_attention`, :class:`xcit.inference.Predictor`), so the figures show
what users get. Photos are scikit-image's bundled astronaut, chelsea (cat) and coffee (public domain);
Fashion-MNIST test images come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or ``--fashion-mnist DIR``. Needs ``pip install scikit-image``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xcit.inference import PredictionWriter, Predictor, load_for_inference, read_metadata
from xcit.viz.pipeline import render_attention

ROOT = Path(__file__).resolve().parents[1]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def write_photos(folder: Path) -> list[Path]:
    from skimage import data

    paths = []
    for name in ("astronaut", "chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


def read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


def write_fashion(folder: Path, source: Path, classes: tuple[int, ...]) -> list[Path]:
    images = read_idx_images(source / "t10k-images-idx3-ubyte.gz")
    with gzip.open(source / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    paths = []
    for c in classes:
        i = int(np.flatnonzero(labels == c)[0])
        path = folder / f"fmnist_{i:04d}_{FASHION_CLASSES[c].split('/')[0].replace(' ', '_').lower()}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(path)
    return paths


def attention(paths: list[Path], out: Path, *, checkpoint: str | None = None, model: str | None = None,
              short_side: int | None = None) -> None:
    """``xcit attention PATHS [--checkpoint C | --model M] -o OUT --img-size S --xca-block -1 --palette --dpi 80``."""
    inf = load_for_inference(checkpoint, model)
    short_side = short_side or min(inf.img_size)
    for result in render_attention(inf, paths, out, short_side=short_side, xca_blocks=[-1], palette=True, dpi=80,
                                   overwrite=True):  # regenerating the docs' figures replaces them
        print(f"{result.path} -> {', '.join(str(f) for f in result.figures)}", flush=True)


def predict(names: list[str], checkpoint: str, output: Path, top_k: int = 3) -> None:
    """``xcit predict NAMES --checkpoint C --top-k 3 -o OUTPUT`` (the CSV of the docs)."""
    inf = load_for_inference(checkpoint)
    k = min(top_k, inf.num_classes)
    with PredictionWriter(output, top_k=k, overwrite=True) as writer:  # the earlier CSV stays if anything fails
        for pred in Predictor(inf).predict(names, top_k=k):
            if pred.error is not None:
                sys.exit(f"{pred.path}: {pred.error}")
            writer.write(pred)
    print(f"wrote {output}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained checkpoint (e.g. the Fashion-MNIST model); 1-channel ones get Fashion-MNIST figures")
    p.add_argument("--model", default="xcit_nano_12_p16", help="random-init architecture for the photos (default xcit_nano_12_p16)")
    p.add_argument("--photos-with-checkpoint", action="store_true", help="run the photos through --checkpoint instead")
    p.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--fashion-classes", type=int, nargs="+", default=[0, 7, 8, 9], help="one test image per class index")
    p.add_argument("--fashion-size", type=int, default=None, help="short side for Fashion-MNIST maps (default: the checkpoint's)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = write_photos(tmp)
        photo_model = dict(checkpoint=args.checkpoint) if args.photos_with_checkpoint else dict(model=args.model)
        torch.manual_seed(0)  # the same random model on every run
        attention(photos, args.out / "photos", short_side=224, **photo_model)
        if args.checkpoint:
            data = read_metadata(args.checkpoint).get("data") or {}
            if int(data.get("in_chans", 3)) == 1 and args.fashion_mnist.is_dir():
                fashion = write_fashion(tmp, args.fashion_mnist, tuple(args.fashion_classes))
                out = args.out / "fashion_mnist"
                attention(fashion, out, checkpoint=args.checkpoint, short_side=args.fashion_size)
                here = os.getcwd()
                os.chdir(tmp)  # file names, not temporary paths, in the CSV
                try:
                    predict([f.name for f in fashion], str(Path(here, args.checkpoint)), Path(here, out, "predictions.csv"))
                finally:
                    os.chdir(here)
            else:
                print("checkpoint is not a 1-channel model or Fashion-MNIST is missing: no Fashion-MNIST figures")
    for f in args.out.rglob("*_xca*.png"):  # stable names for the docs, whatever the model's depth
        if not f.stem.endswith("_xca_last"):
            f.replace(f.with_name(f.stem.rsplit("_xca", 1)[0] + "_xca_last.png"))
    big = [f for f in args.out.rglob("*.png") if f.stat().st_size > 300_000]
    for f in sorted(args.out.rglob("*.png")):
        print(f"{f.relative_to(args.out)}: {f.stat().st_size / 1e3:.0f} KB")
    if big:
        sys.exit(f"figures above 300 KB: {big}; lower --dpi")


if __name__ == "__main__":
    main()
