"""Tiled segmentation against the whole-image forward at sizes too slow for the tests.

``xcit_tiny_12_p16`` (and ``_p8``) Semantic FPN and UperNet with ADE20k's 150 classes, random weights with BatchNorm
statistics moved away from the identity, on crops of a real aerial photograph (deepforest's NEON image): the largest
absolute logit difference and the share of pixels with the same argmax, for several tile sizes (so that seams cross
the image), against ``Segmenter(x)``.

    python benchmarks/dense_exactness.py        # writes benchmarks/dense_exactness.json and prints the table
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dense_large import PHOTO, cpu_name

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CASES = [  # backbone, head, (H, W), tiles
    ("xcit_tiny_12_p16", "fpn", (1024, 1024), (256, 2048)),
    ("xcit_tiny_12_p16", "fpn", (1000, 1536), (384, 2048)),
    ("xcit_tiny_12_p16", "upernet", (1024, 1024), (512,)),
    ("xcit_tiny_12_p16", "upernet", (1000, 1536), (512,)),
    ("xcit_tiny_12_p8", "fpn", (1000, 1536), (512,)),
]


def photo() -> np.ndarray:
    from PIL import Image

    from xcit.data.packaged import package_file

    return np.asarray(Image.open(io.BytesIO(package_file("deepforest", f"data/{PHOTO}", None, ""))).convert("RGB"))


def main() -> None:
    from xcit.inference.streaming import normalise
    from xcit.segment import build_segmenter, segment_large

    torch.set_num_threads(2)
    image = photo()
    rows = []
    for name, head, (h, w), tiles in CASES:
        torch.manual_seed(0)
        model = build_segmenter(150, name, head=head).eval()
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        crop = np.ascontiguousarray(image[:h, :w])
        with torch.no_grad():
            ref = model(normalise(torch.from_numpy(crop).permute(2, 0, 1)[None], MEAN, STD))[0]
        for tile in tiles:
            started = time.perf_counter()
            labels, logits = segment_large(model, crop, MEAN, STD, tile=tile, logits=True)
            differ = labels != ref.argmax(0)
            top2 = ref.topk(2, dim=0).values
            gap = (top2[0] - top2[1])[differ]
            row = {"backbone": name, "head": head, "size": [h, w], "tile": tile,
                   "pixels_differing": int(differ.sum()),
                   "largest_top2_gap_where_differing": float(gap.max()) if gap.numel() else None,
                   "max_abs_diff": float((logits - ref).abs().max()),
                   "same_argmax": float((labels == ref.argmax(0)).float().mean()),
                   "classes_present": int(ref.argmax(0).unique().numel()),
                   "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"cpu": cpu_name(), "torch": torch.__version__, "command": "python benchmarks/dense_exactness.py"}
    (HERE / "dense_exactness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nCPU: {meta['cpu']}\n\n| backbone | head | image | tile | max abs logit diff | same argmax | pixels "
          "differing (their top-2 logit gap in the whole-image forward) |\n|---|---|---|---:|---:|---:|---|")
    for r in rows:
        gap = r["largest_top2_gap_where_differing"]
        print(f"| {r['backbone']} | {r['head']} | {r['size'][0]}x{r['size'][1]} | {r['tile']} | "
              f"{r['max_abs_diff']:.1e} | {100 * r['same_argmax']:.4f} % | {r['pixels_differing']}"
              + (f" (<= {gap:.1e})" if gap is not None else "") + " |")


if __name__ == "__main__":
    main()
