"""Ground truth | prediction figure for a detection checkpoint on the first image of a COCO file.

    python scripts/detect_figures.py runs/detect/trees/last.pt data/detect/trees/annotations/val.json \
        docs/figures/detect_trees.png [--score-thresh 0.5] [--scale 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from xcit.detect.coco import CocoDetection
from xcit.detect.model import load_detector
from xcit.detect.predict import draw_overlay
from xcit.detect.config import image_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("coco_json")
    parser.add_argument("out")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--scale", type=int, default=1, help="enlarge the panels (nearest) for small images")
    parser.add_argument("--index", type=int, default=0, help="which image of the file")
    args = parser.parse_args()
    model, meta = load_detector(args.checkpoint)
    masks = model.roi_heads.has_mask()
    data = CocoDetection(args.coco_json, image_root(Path(args.coco_json), None), masks=masks)
    image, target = data.load(args.index)
    with torch.inference_mode():
        output = model([image.float() / 255])[0]
    truth = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["boxes"]))}
    if masks:
        truth["masks"] = target["masks"][:, None].float()
    classes = meta.get("classes", [])
    left = draw_overlay(image, truth, classes, 0.5, labels=False)
    right = draw_overlay(image, output, classes, args.score_thresh, labels=False)
    w, h = left.size
    s = args.scale
    fig = Image.new("RGB", (2 * w * s + 10, h * s + 22), "white")
    fig.paste(left.resize((w * s, h * s), Image.NEAREST), (0, 22))
    fig.paste(right.resize((w * s, h * s), Image.NEAREST), (w * s + 10, 22))
    draw = ImageDraw.Draw(fig)
    n_pred = int((output["scores"] >= args.score_thresh).sum())
    draw.text((4, 4), f"ground truth ({len(target['boxes'])})", fill="black")
    draw.text((w * s + 14, 4), f"prediction, score >= {args.score_thresh} ({n_pred})", fill="black")
    fig.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
