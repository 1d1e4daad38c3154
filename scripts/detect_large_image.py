"""Largest image XCiT-T12 Mask R-CNN handles in one pass on this machine: wall time and peak memory.

Each size runs in a fresh child process (peak resident memory is per process) under an address-space
cap, so running out of memory is a clean failure instead of the kernel's OOM killer. The image is
a real aerial photo (deepforest's Yellowstone crop) tiled up to the size asked for; the network has
random weights (compute and memory do not depend on the weights, only on the image size and the
fixed proposal / detection counts).

    python scripts/detect_large_image.py --sizes 1333x800 2000x2000 4000x3000 6000x4000 8000x6000 \
        --threads 1 --out docs/detect_large_image.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(width: int, height: int, threads: int, backbone: str, kind: str) -> dict:
    import numpy as np
    import torch

    from xcit.detect.model import build_detector, set_test_size
    from xcit.data.trees import read_voc

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tile, _ = read_voc("2019_YELL_2_541000_4977000_image_crop")
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    image = torch.from_numpy(np.ascontiguousarray(np.tile(tile, reps)[:height, :width])).permute(2, 0, 1).float().div_(255)
    model = build_detector(1, backbone, kind=kind).eval()  # the paper's detector: FPN 256, 1000 proposals, 100 detections
    set_test_size(model, 0)  # native resolution: nothing is resized
    start = time.perf_counter()
    with torch.inference_mode():
        out = model([image])[0]
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"width": width, "height": height, "megapixels": round(width * height / 1e6, 2), "seconds": round(seconds, 2),
            "peak_rss_gib": round(peak_kib / 2**20, 2), "detections": int(out["boxes"].shape[0]),
            "mask_dtype": str(out["masks"].dtype) if "masks" in out else None, "ok": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1333x800", "2000x2000", "4000x3000", "6000x4000", "8000x6000"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbone", default="xcit_tiny_12_p16")
    parser.add_argument("--kind", default="mask_rcnn", choices=["mask_rcnn", "faster_rcnn"])
    parser.add_argument("--mem-cap-gib", type=float, default=16.0, help="address-space cap of each child process")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", nargs=2, type=int, metavar=("W", "H"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cap = int(args.mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(child(*args.child, args.threads, args.backbone, args.kind)))
        return
    rows = []
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        cmd = [sys.executable, __file__, "--child", str(w), str(h), "--threads", str(args.threads), "--backbone",
               args.backbone, "--kind", args.kind, "--mem-cap-gib", str(args.mem_cap_gib)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            row = {"width": w, "height": h, "megapixels": round(w * h / 1e6, 2), "ok": False, "error": err[:300]}
        row["process_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"backbone": args.backbone, "kind": args.kind, "threads": args.threads, "mem_cap_gib": args.mem_cap_gib,
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
