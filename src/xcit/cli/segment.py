"""`xcit segment prepare | train | eval | predict`: semantic segmentation with Semantic FPN / UperNet."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import POSITIVE, add_config_option, add_overwrite_option, number, require_options
from .options import add_training_command
from .predict import add_slide_options, add_streaming_options
from .unreadable import Unreadable, add_policy


def _size(values: list[int] | None, option: str) -> list[int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"expected {option} H [W] with positive sizes, got {values}")
    return [values[0], values[-1]]


def _scale(values) -> list[int] | None | str:
    """'none' -> None (keep the image size); [L, S] -> [L, S]; absent -> 'default'."""
    if values is None:
        return "default"
    if isinstance(values, str):
        values = [values]
    if [str(v).lower() for v in values] == ["none"]:
        return None
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"expected --scale LONG SHORT or 'none', got {values}") from None
    if len(ints) != 2 or min(ints) < 1:
        raise ValueError(f"expected --scale LONG SHORT (e.g. 2048 512) or 'none', got {values}")
    return ints


def _eval_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    g = p.add_argument_group("test-time inference")
    g.add_argument(f"--{prefix}mode", choices=["whole", "slide"], default=None, help="whole image or sliding window")
    g.add_argument(f"--{prefix}scale", nargs="+", default=None, metavar="PX",
                   help="keep-ratio rescale before inference: LONG SHORT (ADE20k 2048 512) or 'none' for the native size")
    g.add_argument(f"--{prefix}crop-size", type=POSITIVE, nargs="+", default=None, metavar="PX",
                   help="slide window H [W]")
    g.add_argument(f"--{prefix}stride", type=POSITIVE, nargs="+", default=None, metavar="PX", help="slide step H [W]")
    g.add_argument(f"--{prefix}flip", action=argparse.BooleanOptionalAction, default=None, help="add the mirrored prediction")


def _eval_settings(args: argparse.Namespace, base, prefix: str = ""):
    from dataclasses import replace

    get = lambda k: getattr(args, prefix + k)
    changes = {}
    if get("mode") is not None:
        changes["mode"] = get("mode")
    scale = _scale(get("scale"))
    if scale != "default":
        changes["scale"] = scale
    if get("crop_size") is not None:
        changes["crop_size"] = _size(get("crop_size"), "--crop-size")
    if get("stride") is not None:
        changes["stride"] = _size(get("stride"), "--stride")
    if get("flip") is not None:
        changes["flip"] = get("flip")
    return replace(base, **changes)


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.options import AMP_MODES

    seg = sub.add_parser("segment", help="semantic segmentation (Semantic FPN / UperNet on the XCiT pyramid)",
                         description="Semantic segmentation with XCiT backbones. See docs/segmentation.md.")
    tasks = seg.add_subparsers(dest="segment_command", required=True, metavar="ACTION")

    p = tasks.add_parser("prepare", help="write a real dataset (nuclei, trees) as image/mask folders")
    p.add_argument("dataset", choices=["nuclei", "trees"])
    p.add_argument("--output", "-o", default=None, help="output folder (ADE20k layout)")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)
    add_overwrite_option(p, "replace an earlier dataset in --output (its images/, annotations/, dataset.yaml and "
                            "SOURCE.txt are removed once the new one is complete)")
    p.add_argument("--source", default=None, metavar="PATH",
                   help="the package's .whl file or unpacked folder (default: the installed stardist / deepforest)")
    add_config_option(p)
    p.set_defaults(func=run_prepare)

    add_training_command(
        tasks, "train", "xcit.segment", help="train a segmenter (defaults: the paper's ADE20k recipe)",
        description="Train Semantic FPN or UperNet on an XCiT backbone. Distributed with torchrun. Defaults follow the "
                    "paper: AdamW lr 6e-5 for a global batch of 16, wd 0.01, poly with warm-up, 512x512 crops, 2 "
                    "images per process. --config YAML files override the defaults and the command line overrides "
                    "them all; the options shared by every training command are under 'run'.",
    ).add_argument("--flip", dest="hflip", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = tasks.add_parser("eval", help="mIoU, per-class IoU and pixel accuracy of a checkpoint on a split")
    p.add_argument("--checkpoint", required=False, default=None, help="segmentation checkpoint (best.pt / last.pt), an official ADE20k file or its name (upernet_xcit_small_12_p16, sem_fpn_...)")
    p.add_argument("--data", default=None, help="dataset root")
    p.add_argument("--split", default="validation")
    p.add_argument("--num-classes", type=POSITIVE, default=None)
    p.add_argument("--ignore-index", type=number(int, 0, 65535), default=None)
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None)
    _eval_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=AMP_MODES, default="none", help="mixed precision: none, bf16, fp16 (CUDA only), auto")
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--json", dest="output", help=argparse.SUPPRESS)
    add_overwrite_option(p, "replace an existing --output file")
    add_config_option(p)
    p.set_defaults(func=run_eval)

    p = tasks.add_parser(
        "predict", help="coloured PNG masks and overlays for images or folders; large and whole-slide images tile by tile",
        description="Segment images. Images above --large-pixels (or all, with --streaming always) are segmented whole "
                    "at native resolution, tile by tile with the exact global context of the whole image (the result "
                    "equals the whole-image forward), into NAME_labels.tif (tiled, compressed, pyramidal; pixel values "
                    "are class indices), NAME_overlay.png (downsampled) and NAME_areas.json (per-class areas). "
                    "--mode / --scale / --flip apply to the other images only.")
    add_policy(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files and/or folders")
    p.add_argument("--checkpoint", default=None, help="segmentation checkpoint, an official ADE20k file or its name (upernet_xcit_small_12_p16)")
    p.add_argument("--output", "-o", default="predictions",
                   help="output folder (NAME_mask.png, NAME_overlay.png; NAME is the file's stem, or its name where "
                        "two inputs share a stem: a.png_mask.png, a.jpg_mask.png)")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)
    add_overwrite_option(p, "replace files of an earlier run in --output (NAME_mask.png, NAME_overlay.png)")
    p.add_argument("--alpha", type=number(float, 0, 1), default=0.5, help="overlay opacity of the mask")
    _eval_options(p)
    p.add_argument("--device", default="auto")
    add_streaming_options(p)
    add_slide_options(p)
    add_config_option(p)
    p.set_defaults(func=run_predict)


def run_prepare(args: argparse.Namespace) -> int:
    from ..segment.prepare import prepare

    require_options(args, "output")
    out = prepare(args.dataset, args.output, args.source, overwrite=args.overwrite)
    print(f"wrote {args.dataset} to {out} (training: 3 quadrants, validation: the held-out bottom-right quadrant)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data.outputs import atomic_write, claim_file
    from ..segment.config import EvalSettings
    from ..segment.evaluate import evaluate_checkpoint
    from ..segment.metrics import format_metrics
    from ..segment.model import load_segmenter

    require_options(args, "checkpoint", "data")
    if args.output:  # before any work
        claim_file(args.output, overwrite=args.overwrite, inputs=[args.checkpoint])
    _, meta = load_segmenter(args.checkpoint)
    settings = _eval_settings(args, EvalSettings(**meta.get("eval", {})))
    metrics, classes = evaluate_checkpoint(args.checkpoint, args.data, args.split, settings, args.device, args.amp,
                                           args.num_classes, args.ignore_index, args.reduce_zero_label)
    print(format_metrics(metrics, classes))
    print(f"inference: {settings.mode}, scale {settings.scale or 'native'}"
          + (f", window {settings.crop_size} stride {settings.stride}" if settings.mode == "slide" else "")
          + (", flip" if settings.flip else ""))
    if args.output:
        with atomic_write(args.output) as tmp:
            tmp.write_text(json.dumps({**metrics, "classes": classes, "split": args.split}, indent=2))
    return 0


def prediction_files(stem: str) -> list[str]:
    """The names `xcit segment predict` writes for an image of output name ``stem``."""
    return [f"{stem}_mask.png", f"{stem}_overlay.png"]


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from ..data.images import display_path, read_image
    from ..data.outputs import atomic_write, claim_files, unique_stems
    from ..segment.config import EvalSettings
    from ..segment.data import colorize, infer, overlay
    from ..segment.model import load_segmenter, normalization
    from ..segment.tiled import DEFAULT_TILE
    from ..segment.whole_slide import output_names, segment_file
    from ..train.distributed import pick_device
    from .predict import check_slide_options, input_images, streamed

    require_options(args, "checkpoint", "inputs")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"expected --alpha in [0, 1], got {args.alpha}")
    tile = DEFAULT_TILE if args.tile is None else args.tile
    if tile % 32:
        raise ValueError(f"expected --tile to be a multiple of 32 pixels, got {tile}")
    check_slide_options(args)
    files = [Path(f) for f in input_images(args.inputs)]
    stems = unique_stems(files)
    large = [streamed(args, str(f)) for f in files]
    out = Path(args.output)
    names = [n for stem, big in zip(stems, large) for n in (output_names(stem) if big else prediction_files(stem))]
    claim_files(out, names, overwrite=args.overwrite)  # before any work
    model, meta = load_segmenter(args.checkpoint)
    device = pick_device(args.device)
    model.to(device)
    settings = _eval_settings(args, EvalSettings(**meta.get("eval", {})))
    mean, std = normalization(meta)
    palette = meta.get("palette") or []
    if len(palette) < model.num_classes:
        from ..segment.data import default_palette

        palette = default_palette(model.num_classes)
    classes = meta.get("classes") or [f"class{i}" for i in range(model.num_classes)]
    unreadable = Unreadable("segment predict")
    written = 0
    for path, stem, big in zip(files, stems, large):
        try:
            if big:
                summary = segment_file(
                    model, path, out, stem, mean=mean, std=std, classes=classes, palette=palette, level=args.level,
                    mpp=args.mpp, tile=tile, tokens_per_chunk=args.tokens_per_chunk,
                    max_resident_bytes=int(args.max_resident_gb * 2**30), alpha=args.alpha, overwrite=args.overwrite,
                    meta={"checkpoint": str(args.checkpoint)})
                written += 3
                top = sorted(summary["classes"], key=lambda c: -c["pixels"])[:3]
                h, w = summary["size"]
                print(f"{display_path(path)} ({w} x {h}, level {summary['level']}, {summary['seconds']:.0f} s): "
                      + ", ".join(f"{c['name']} {100 * c['fraction']:.1f}%" for c in top if c["pixels"]))
                continue
            image = read_image(path)
            with torch.inference_mode():  # an image the model cannot take (too small) is named and skipped too
                pred = infer(model, image, mode=settings.mode, scale=settings.scale, crop_size=settings.crop_size,
                             stride=settings.stride, flip=settings.flip, mean=mean, std=std).argmax(0)
        except ValueError as err:
            unreadable(str(path), str(err))
            continue
        mask = colorize(pred, palette)
        with atomic_write(out / f"{stem}_mask.png") as tmp:
            mask.save(tmp, format="PNG")
        with atomic_write(out / f"{stem}_overlay.png") as tmp:
            overlay(image, mask, args.alpha).save(tmp, format="PNG")
        written += 2
        counts = torch.bincount(pred.flatten(), minlength=model.num_classes).float() / pred.numel()
        top = sorted(((c.item(), classes[i]) for i, c in enumerate(counts) if c > 0), reverse=True)[:3]
        print(f"{display_path(path)}: " + ", ".join(f"{name} {100 * share:.1f}%" for share, name in top))
    print(f"wrote {written} files to {display_path(out)} (NAME_mask.png: palette PNG whose pixel values are class "
          "indices; NAME_labels.tif for large images: pyramidal TIFF of class indices)")
    return unreadable.finish(len(files))
