"""`xcit detect prepare | train | eval | predict`: Mask R-CNN / Faster R-CNN with XCiT backbones on COCO data."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import NON_NEGATIVE, POSITIVE, add_config_option, add_overwrite_option, number, require_options
from .options import add_training_command
from .predict import add_slide_options, add_streaming_options
from .unreadable import Unreadable, add_policy


def register(sub: argparse._SubParsersAction) -> None:
    det = sub.add_parser("detect", help="object detection and instance segmentation (Mask R-CNN / Faster R-CNN)",
                         description="Detection with XCiT backbones on torchvision's detectors. See docs/detection.md.")
    tasks = det.add_subparsers(dest="detect_command", required=True, metavar="ACTION")

    p = tasks.add_parser("prepare", help="write a real dataset (trees, nuclei) as a COCO-format dataset")
    p.add_argument("dataset", choices=["trees", "nuclei"])
    p.add_argument("--output", "-o", default=None, help="output folder: images/{train,val}, annotations/{train,val}.json, SOURCE.txt")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)
    add_overwrite_option(p, "replace an earlier dataset in --output (its images/, annotations/ and SOURCE.txt are "
                            "removed once the new one is complete)")
    p.add_argument("--source", default=None, metavar="PATH", help="the package's .whl file or unpacked folder (default: installed)")
    p.add_argument("--in-domain", action="store_true",
                   help="trees: also train on three quadrants of OSBS_029 and hold out its bottom-right one (a same-site check)")
    add_config_option(p)
    p.set_defaults(func=run_prepare)

    add_training_command(
        tasks, "train", "xcit.detect", help="train a detector (defaults: the paper's COCO Mask R-CNN recipe)",
        description="Train Mask R-CNN or Faster R-CNN with an XCiT + FPN backbone on a COCO-format dataset. "
                    "Distributed with torchrun. Defaults: AdamW lr 1e-4 for a global batch of 16, wd 0.05, 36 epochs "
                    "(steps at 27 and 33), warm-up, 2 images per process, multi-scale 480..800. --config YAML files "
                    "override the defaults and the command line overrides them all; the options shared by every "
                    "training command are under 'run'.")

    p = tasks.add_parser("eval", help="COCO box (and mask) AP of a checkpoint on a COCO file")
    p.add_argument("--checkpoint", default=None, help="detection checkpoint (best.pt / last.pt), an official COCO file or its name (maskrcnn_xcit_tiny_12_p16)")
    p.add_argument("--json", dest="coco_json", default=None, metavar="FILE", help="COCO file of the images to evaluate")
    p.add_argument("--data", default=None, metavar="ROOT", help="a prepared dataset (evaluates ROOT/annotations/val.json)")
    p.add_argument("--images", default=None, help="image root (default: ROOT/images, else the JSON's folder)")
    _test_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=POSITIVE, default=None)
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--overlays", default=None, metavar="DIR", help="also write an overlay PNG per image here")
    add_overwrite_option(p, "replace an existing --output file and earlier overlays in --overlays")
    add_config_option(p)
    p.set_defaults(func=run_eval)

    p = tasks.add_parser(
        "predict", help="PNG overlays and a COCO-format JSON of the detections in images or folders",
        description="Detect objects in images. Images above --large-pixels (or all, with --streaming always) are "
                    "processed whole at native resolution: the backbone once over the whole image (exact global "
                    "context), the FPN, RPN and RoI heads over overlapping tiles, detections merged across tiles, into "
                    "NAME_predictions.json (COCO), NAME.geojson (georeferenced TIFFs) and NAME_overlay.png.")
    add_policy(p, ', and under "unreadable" in predictions.json')
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files and/or folders")
    p.add_argument("--checkpoint", default=None, help="detection checkpoint, an official COCO file or its name (maskrcnn_xcit_tiny_12_p16)")
    p.add_argument("--output", "-o", default="detections",
                   help="output folder (NAME_overlay.png, predictions.json; NAME is the file's stem, or its name where "
                        "two inputs share a stem: a.png_overlay.png, a.jpg_overlay.png)")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)
    add_overwrite_option(p, "replace files of an earlier run in --output (NAME_overlay.png, predictions.json)")
    p.add_argument("--score-thresh", type=number(float, 0, 1), default=0.5,
                   help="keep detections scoring at least this, in [0, 1] (default 0.5)")
    _test_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=POSITIVE, default=None)
    add_streaming_options(p)
    add_slide_options(p)
    p.add_argument("--overlap", type=NON_NEGATIVE, default=None, metavar="PX",
                   help="streaming path: overlap of neighbouring tiles, a multiple of 32; objects up to this size lie "
                        "whole in the tile that owns their centre (default 256)")
    add_config_option(p)
    p.set_defaults(func=run_predict)


def _test_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-size", type=NON_NEGATIVE, default=None,
                   help="shorter side at test time (default: the checkpoint's; 0: each image at its own resolution)")
    p.add_argument("--max-size", type=POSITIVE, default=None, help="cap on the longer side (default: the checkpoint's)")
    p.add_argument("--detections", type=POSITIVE, default=None,
                   help="detections kept per image (default: the checkpoint's, 100)")


def run_prepare(args: argparse.Namespace) -> int:
    from ..detect.prepare import prepare

    if args.in_domain and args.dataset != "trees":
        raise ValueError("expected --in-domain only with trees (nuclei always holds out one quadrant of its image)")
    require_options(args, "output")
    paths = prepare(args.dataset, args.output, args.source, overwrite=args.overwrite,
                    **({"in_domain": True} if args.in_domain else {}))
    print(f"wrote {args.dataset} to {args.output}: {paths['train']} (training), {paths['val']} (held out); see SOURCE.txt")
    return 0


def _load(args: argparse.Namespace):
    import torch

    from ..detect.model import load_detector, set_test_size
    from ..train.distributed import pick_device

    require_options(args, "checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_detector(args.checkpoint)  # weights holding NaN or infinity are refused there
    if args.test_size is not None or args.max_size is not None:
        set_test_size(model, model.transform.test_size if args.test_size is None else args.test_size, args.max_size)
    if args.detections is not None:
        model.roi_heads.detections_per_img = args.detections
    device = pick_device(args.device)
    return model.to(device), meta, device


def run_eval(args: argparse.Namespace) -> int:
    from ..data.outputs import atomic_write, claim_file, claim_files, unique_stems
    from ..detect.coco import CocoDetection
    from ..detect.config import image_root
    from ..detect.evaluation import evaluate_results, format_metrics, predict_dataset
    from ..detect.predict import predict_files, prediction_files
    from ..detect.train import flat_metrics

    if args.coco_json is None and args.data:
        args.coco_json = str(Path(args.data) / "annotations" / "val.json")
    require_options(args, "coco_json")
    if args.output:  # before any work
        claim_file(args.output, overwrite=args.overwrite, inputs=[args.coco_json, args.checkpoint])
    model, meta, device = _load(args)
    masks = model.roi_heads.has_mask()
    path = Path(args.coco_json)
    dataset = CocoDetection(path, image_root(path, args.images), masks=masks, strict=args.strict)
    if dataset.class_names != meta.get("classes", dataset.class_names):
        raise ValueError(f"{path} has categories {dataset.class_names}, the checkpoint was trained on {meta['classes']}")
    files = [dataset.root / im["file_name"] for im in dataset.images]
    if args.overlays:
        claim_files(args.overlays, prediction_files(unique_stems(files)), overwrite=args.overwrite, option="--overlays")
    results = predict_dataset(model, dataset, device, progress=True)
    metrics = evaluate_results(dataset, results, masks)
    print(f"{path}: {dataset.report.summary()}")
    print(format_metrics(metrics))
    if args.output:
        with atomic_write(args.output) as tmp:
            tmp.write_text(json.dumps({"json": str(path), **flat_metrics(metrics)}, indent=2))
    if args.overlays:
        predict_files(model, files, args.overlays, meta.get("classes", []), meta.get("category_ids", []), device,
                      overwrite=args.overwrite)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..data.images import display_path
    from ..data.outputs import claim_files, unique_stems
    from ..detect.predict import predict_files, prediction_files
    from ..detect.tiled import DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling, large_prediction_files, predict_large_file
    from .predict import check_slide_options, input_images, streamed

    require_options(args, "checkpoint", "inputs")
    tile = DEFAULT_TILE if args.tile is None else args.tile
    overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    check_tiling(tile, overlap)
    check_slide_options(args)
    files = [Path(f) for f in input_images(args.inputs)]
    stems = unique_stems(files)
    large = [streamed(args, str(f)) for f in files]
    small = [f for f, big in zip(files, large) if not big]
    names = prediction_files(unique_stems(small)) if small else []
    names += [n for stem, big in zip(stems, large) if big for n in large_prediction_files(stem, False)]
    claim_files(args.output, names, overwrite=args.overwrite)  # before any work
    model, meta, device = _load(args)
    n = model.roi_heads.box_predictor.cls_score.out_features - 1
    classes = meta.get("classes") or [f"class{i}" for i in range(1, n + 1)]
    unreadable = Unreadable("detect predict")
    for path, stem, big in zip(files, stems, large):
        if not big:
            continue
        try:
            summary = predict_large_file(
                model, meta, path, args.output, tile=tile, overlap=overlap, score_thresh=args.score_thresh,
                level=args.level, mpp=args.mpp, tokens_per_chunk=args.tokens_per_chunk,
                max_resident_bytes=int(args.max_resident_gb * 2**30), stem=stem, overwrite=args.overwrite)
        except ValueError as err:
            unreadable(str(path), str(err))
            continue
        print(f"{display_path(path)}: {summary['detections']} objects with score >= {args.score_thresh} "
              f"({summary['tiles']} tiles, {sum(summary['seconds'].values()):.0f} s) -> {stem}_predictions.json")
    if small:
        summary = predict_files(model, small, args.output, classes, meta.get("category_ids") or list(range(1, n + 1)),
                                device, args.score_thresh, on_error=unreadable, overwrite=args.overwrite)
        print(f"wrote {summary['images']} overlays and {args.output}/predictions.json ({summary['detections']} "
              "detections)")
    return unreadable.finish(len(files))
