"""Whole-image segmentation of large images: peak memory and time per pixel against the image side.

Each measurement runs in its own process (peak RSS = the process's ``VmHWM``): the tiled path is what
``xcit segment predict IMAGE --streaming always`` runs (:func:`xcit.segment.segment_file`: reading a tiled, compressed
TIFF, writing the pyramidal label TIFF, the overlay and the areas: input and output included); the reference is the whole-image forward
``Segmenter(x).argmax(1)`` on the image in memory (forward only), where it fits. The images are mosaics of a real
aerial photograph (deepforest's 2019_YELL_2_528000_4978000_image_crop2.png, NEON, CC0), the model an
``xcit_tiny_12_p16`` Semantic FPN with ADE20k's 150 classes (weights random: time and memory do not depend on them).

    python benchmarks/dense_large.py --sides 2048 16384 --whole 2048 --threads 2   # results to benchmarks/dense_large.*

Writes ``dense_large.json`` (every run, with ``lscpu``'s model name), ``dense_large.md`` (the table) and
``dense_large.png`` (seconds per megapixel and peak RSS against the side).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PHOTO = "2019_YELL_2_528000_4978000_image_crop2.png"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def make_image(side: int, path: Path) -> None:
    """A side x side RGB mosaic of the aerial photograph (mirrored copies, so no seam is a hard edge), written as a
    tiled, deflate-compressed TIFF in row bands."""
    import io

    import tifffile
    from PIL import Image

    from xcit.data.packaged import package_file

    photo = np.asarray(Image.open(io.BytesIO(package_file("deepforest", f"data/{PHOTO}", None, ""))).convert("RGB"))
    ph, pw = photo.shape[:2]
    row_block = np.concatenate([photo, photo[:, ::-1]], axis=1)
    block = np.concatenate([row_block, row_block[::-1]], axis=0)  # 2ph x 2pw, periodic
    reps = -(-side // block.shape[1])

    def tiles():
        for y in range(0, side, 256):
            band_rows = [(y + i) % block.shape[0] for i in range(min(256, side - y))]
            band = np.tile(block[band_rows], (1, reps, 1))[:, :side]
            band = np.pad(band, ((0, 256 - band.shape[0]), (0, (-side) % 256), (0, 0)))
            for x in range(0, band.shape[1], 256):
                yield band[:, x:x + 256]

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256), compression="zlib",
                     photometric="rgb")


def make_checkpoint(path: Path) -> None:
    import torch

    from xcit.segment.model import build_segmenter, save_segmenter

    torch.manual_seed(0)
    model = build_segmenter(150, "xcit_tiny_12_p16", head="fpn").eval()
    save_segmenter(model, path, meta={"data": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.task == "detect":
        seconds = detect_child(args)
    elif args.mode == "tiled":  # what `xcit segment predict IMAGE --streaming always --tile T` runs
        from xcit.segment import load_segmenter, segment_file
        from xcit.segment.data import default_palette
        from xcit.segment.model import normalization

        started = time.perf_counter()
        model, meta = load_segmenter(args.checkpoint)
        mean, std = normalization(meta)
        segment_file(model, args.image, args.out, "mosaic", mean=mean, std=std, tile=args.tile, overwrite=True,
                     classes=[f"class{i}" for i in range(model.num_classes)], palette=default_palette(model.num_classes),
                     progress=False)
        seconds = time.perf_counter() - started
    else:
        import tifffile

        from xcit.inference.streaming import normalise
        from xcit.segment.model import load_segmenter

        model, _ = load_segmenter(args.checkpoint)
        image = torch.from_numpy(tifffile.imread(args.image)).permute(2, 0, 1)[None]
        x = normalise(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        del image
        started = time.perf_counter()
        with torch.no_grad():
            model(x).argmax(1)
        seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def detect_child(args: argparse.Namespace) -> float:
    """Detection: the tiled path is what ``xcit detect predict IMAGE --streaming always`` runs
    (:func:`xcit.detect.tiled.predict_large_file`: COCO JSON, overlay); the whole-image forward is ``model([x])`` at
    native resolution (``--test-size 0``), forward only."""
    import torch

    from xcit.detect.model import load_detector, set_test_size

    if args.mode == "tiled":
        from xcit.detect.tiled import predict_large_file

        started = time.perf_counter()
        model, meta = load_detector(args.checkpoint)
        predict_large_file(model, meta, args.image, args.out, tile=args.tile, overwrite=True, progress=False)
        return time.perf_counter() - started
    import tifffile

    model, _ = load_detector(args.checkpoint)
    set_test_size(model, 0)
    x = torch.from_numpy(tifffile.imread(args.image)).permute(2, 0, 1).float().div_(255)
    started = time.perf_counter()
    with torch.no_grad():
        model([x])
    return time.perf_counter() - started


def measure(mode: str, side: int, image: Path, checkpoint: Path, threads: int, tile: int, work: Path,
            task: str = "segment") -> dict:
    cmd = [sys.executable, __file__, "_child", "--mode", mode, "--image", str(image), "--checkpoint", str(checkpoint),
           "--threads", str(threads), "--tile", str(tile), "--out", str(work / f"out_{task}_{side}"), "--task", task]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"mode": mode, "side": side, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(mode=mode, side=side, pixels=side * side,
                  seconds_per_megapixel=result["seconds"] / (side * side / 1e6))
    return result


def report(runs: list[dict], meta: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if "error" not in r]
    whole = {r["side"]: r for r in ok if r["mode"] == "whole"}
    base = min(whole.values(), key=lambda r: abs(r["side"] - 2048)) if whole else None
    lines = [f"{meta['task']}: {meta['model']}, tile {meta['tile']}. CPU: {meta['cpu']}, {meta['threads']} threads, "
             f"torch {meta['torch']}; command: `{meta['command']}`", "",
             "| side | path | seconds | s / megapixel | vs whole-image forward at "
             f"{base['side'] if base else '-'} | peak RSS |", "|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['side']} | {r['mode']} | failed: {r['error'][0]} | | | |")
            continue
        ratio = r["seconds_per_megapixel"] / base["seconds_per_megapixel"] if base else float("nan")
        lines.append(f"| {r['side']} | {r['mode']} | {r['seconds']:.1f} | {r['seconds_per_megapixel']:.2f} | "
                     f"{ratio:.2f}x | {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("tiled", "o-"), ("whole", "s--")):
        rs = sorted((r for r in ok if r["mode"] == mode), key=lambda r: r["side"])
        if rs:
            sides = [r["side"] for r in rs]
            axes[0].plot(sides, [r["seconds_per_megapixel"] for r in rs], marker, label=mode)
            axes[1].plot(sides, [r["peak_rss_bytes"] / 2**30 for r in rs], marker, label=mode)
    for ax, title in zip(axes, ("seconds per megapixel", "peak RSS (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("image side (px)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{meta['task']}: {meta['model']}; {meta['cpu']}, {meta['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        p = argparse.ArgumentParser()
        for name in ("--mode", "--image", "--checkpoint", "--out", "--task"):
            p.add_argument(name)
        p.add_argument("--threads", type=int)
        p.add_argument("--tile", type=int)
        child(p.parse_args(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--whole", type=int, nargs="*", default=[1024, 2048], help="sides to run the whole-image forward at")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile", type=int, default=None, help="tile side (default: segment 2048, detect 1024)")
    p.add_argument("--task", choices=["segment", "detect"], default="segment")
    p.add_argument("--detector", default=None,
                   help="detect: a detector checkpoint, e.g. the trees model of docs/detection.md (runs/detect/trees/"
                        "best.pt); the model's weights decide how many proposals survive, so random weights would not do")
    p.add_argument("--output", default=str(HERE / "dense_large"))
    p.add_argument("--work", default=None, help="folder for the images and outputs (default: a temporary one)")
    args = p.parse_args()
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="xcit-dense-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.task == "detect":
        if not args.detector:
            raise SystemExit("--task detect needs --detector CHECKPOINT")
        checkpoint = Path(args.detector)
    else:
        checkpoint = work / "fpn_tiny_150.pt"
        if not checkpoint.exists():
            make_checkpoint(checkpoint)
    if args.tile is None:
        args.tile = 2048 if args.task == "segment" else 1024
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "tile": args.tile, "task": args.task,
            "model": "xcit_tiny_12_p16 Semantic FPN, 150 classes" if args.task == "segment" else str(checkpoint),
            "command": "python benchmarks/dense_large.py " + " ".join(sys.argv[1:])}
    runs = []
    for side in sorted(set(args.sides) | set(args.whole)):
        image = work / f"mosaic_{side}.tif"
        if not image.exists():
            make_image(side, image)
        modes = (["whole"] if side in args.whole else []) + (["tiled"] if side in args.sides else [])
        for mode in modes + (["whole"] if side in args.whole and len(modes) > 1 else []):  # baseline twice, around
            runs.append(measure(mode, side, image, checkpoint, args.threads, args.tile, work, args.task))
            print(json.dumps(runs[-1]), flush=True)
    out = Path(args.output)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    report(runs, meta, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
