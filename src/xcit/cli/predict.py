"""`xcit predict`: top-k classes of image files or folders, batched, to a table, CSV or JSON Lines."""
from __future__ import annotations

import argparse
import sys

from .config import NON_NEGATIVE, POSITIVE, add_config_option, add_overwrite_option, number
from .unreadable import Unreadable, add_policy


def add_model_options(p: argparse.ArgumentParser, img_size_help: str | None = None) -> None:
    """--checkpoint / --model / --device (shared by predict, attention and export)."""
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="weights file; the architecture, class names and preprocessing are read from it")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="architecture name (e.g. xcit_nano_12_p16); without --checkpoint it is randomly initialised")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")


def add_streaming_options(p: argparse.ArgumentParser) -> None:
    """--streaming / --large-pixels / --tokens-per-chunk (shared by predict, attention and embed)."""
    p.add_argument("--streaming", choices=["auto", "always", "never"], default="auto",
                   help="exact bounded-memory forward at the image's native resolution (xcit.streaming): auto = for "
                        "images above --large-pixels, always, or never (default auto)")
    p.add_argument("--large-pixels", type=POSITIVE, default=None, metavar="N",
                   help="pixel count above which --streaming auto applies (default 8192 x 8192 = 67,108,864)")
    p.add_argument("--tokens-per-chunk", type=POSITIVE, default=16384, metavar="N",
                   help="streaming forward: tokens per chunk / tile, which bounds its temporaries (default 16384)")


def add_slide_options(p: argparse.ArgumentParser) -> None:
    """--level / --mpp / --tile / --max-resident-gb: how dense prediction reads and tiles a large image (shared by
    ``segment predict`` and ``detect predict``)."""
    g = p.add_argument_group("large and whole-slide images (the streaming path)")
    g.add_argument("--level", type=NON_NEGATIVE, default=None, metavar="N",
                   help="pyramid level of a whole-slide TIFF / OME-TIFF / SVS to read (0 = full resolution; default 0)")
    g.add_argument("--mpp", type=number(float, 0, low_open=True), default=None, metavar="UM",
                   help="read the pyramid level nearest this many microns per pixel (as the file states it)")
    g.add_argument("--tile", type=POSITIVE, default=None, metavar="PX",
                   help="tile side in pixels, a multiple of 32 (default: segment 2048, detect 1024)")
    g.add_argument("--max-resident-gb", type=number(float, 0), default=2.0, metavar="GB",
                   help="the backbone's kept block outputs above this size go to a temporary file (TMPDIR), removed "
                        "afterwards (default 2)")


def check_slide_options(args: argparse.Namespace) -> None:
    """Refuse --level with --mpp (each picks the pyramid level) before any work."""
    if args.level is not None and args.mpp is not None:
        raise ValueError("expected --level or --mpp, not both")


def streamed(args: argparse.Namespace, path: str) -> bool:
    """Whether ``path`` goes through the streaming forward under the --streaming options."""
    from ..inference.gigapixel import LARGE_IMAGE_PIXELS, is_large

    if args.streaming != "auto":
        return args.streaming == "always"
    limit = LARGE_IMAGE_PIXELS if args.large_pixels is None else args.large_pixels
    if limit < 1:
        raise ValueError(f"expected --large-pixels >= 1, got {limit}")
    return is_large(path, limit)


def load_model(args: argparse.Namespace, img_size=None, crop_pct=None):
    """The :class:`InferenceModel` the options name; warns on stderr when it is randomly initialised."""
    from ..inference import load_for_inference
    from ..train.distributed import pick_device

    if args.checkpoint is None and args.model is None:
        raise ValueError("expected --checkpoint CKPT or --model NAME (random weights), got neither")
    inf = load_for_inference(args.checkpoint, args.model, img_size=img_size, crop_pct=crop_pct, device=pick_device(args.device))
    if inf.random_init:
        from ..inference.loading import RANDOM_INIT_WARNING

        print(RANDOM_INIT_WARNING.format(name=inf.source.split(" ")[0]), file=sys.stderr)
    return inf


def input_images(inputs: list[str], lists: list[str] = ()) -> list[str]:
    """The images every prediction command reads: files (kept even when missing, to be reported as unreadable),
    folders searched recursively and list files; ``ValueError`` when there are none."""
    from ..data.images import collect_images

    paths = collect_images(inputs, lists)
    if not paths:
        given = ", ".join(map(str, [*inputs, *lists])) or "nothing"
        raise ValueError(f"expected images (files, or folders holding images), found none in {given}")
    return paths


def add_input_options(p: argparse.ArgumentParser) -> None:
    """Images to read: files and folders as arguments, and list files."""
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files and/or folders (searched recursively)")
    p.add_argument("--list", action="append", default=[], metavar="FILE", dest="lists",
                   help="text file of image paths, one per line ('-': stdin); repeatable")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="top-k classes of images, folders or image lists (table, CSV or JSONL)",
        description=(
            "Classify image files in batches. Images above --large-pixels (large TIFF / PNG) are classified whole, "
            "at native resolution, by the exact bounded-memory streaming forward."
        ),
    )
    add_policy(p, ", and as the image's row with an error (table, CSV error column, JSONL error field)")
    add_input_options(p)
    add_model_options(p)
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="write predictions to FILE.csv or FILE.jsonl")
    add_overwrite_option(p, "replace an existing --output file")
    p.add_argument("--format", choices=["csv", "jsonl"], default=None, help="output format (default: from the extension)")
    p.add_argument("--top-k", type=POSITIVE, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="torch threads for the model and, when > 1, as many image-decoding workers")
    p.add_argument("--img-size", type=POSITIVE, nargs="+", default=None, metavar="PX",
                   help="eval size H [W] (default: the checkpoint's, else 224)")
    p.add_argument("--crop-pct", type=number(float, 0, 1, low_open=True), default=None,
                   help="centre-crop ratio (default: the checkpoint's, else 1.0)")
    p.add_argument("--show", type=NON_NEGATIVE, default=20,
                   help="with --output, also print the table when there are at most this many images (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="run the plain model instead of its inference transform (xcit.optimize; same outputs, faster)")
    add_streaming_options(p)
    add_config_option(p)
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..data.images import display_path
    from ..data.outputs import claim_file
    from ..inference.predict import PredictionWriter, Predictor, format_row, table_header, table_width

    paths = input_images(args.inputs, args.lists)
    if args.top_k < 1:
        raise ValueError(f"expected --top-k >= 1, got {args.top_k}")
    if args.output:  # before the model is loaded: a refusal costs nothing
        claim_file(args.output, overwrite=args.overwrite, inputs=[*paths, *args.lists, args.checkpoint])
    inf = load_model(args, img_size=args.img_size, crop_pct=args.crop_pct)
    predictor = Predictor(inf, next(inf.model.parameters()).device, optimize=args.optimize)
    k = min(args.top_k, inf.num_classes)
    writer = PredictionWriter(args.output, args.format, k, overwrite=args.overwrite) if args.output else None
    show = writer is None or len(paths) <= args.show  # the table streams to stdout as batches complete
    width = table_width(paths)
    if show:
        print(table_header(width, k), flush=True)
    unreadable = Unreadable("predict")
    try:
        for pred in _predictions(args, inf, predictor, paths, k):
            if pred.error is not None:
                unreadable(pred.path, pred.error)
            if writer is not None:
                writer.write(pred)
            if show:
                print(format_row(pred, width))
    except BaseException:
        if writer is not None:
            writer.abort()  # an earlier --output file stays as it was
        raise
    if writer is not None:
        writer.close()
    summary = f"{len(paths)} image(s), {len(paths) - len(unreadable)} classified, {len(unreadable)} unreadable"
    if writer is not None:
        summary += f"; wrote {writer.format.upper()} to {display_path(writer.path)}"
    print(summary, file=sys.stderr)
    return unreadable.finish(len(paths))


def _predictions(args: argparse.Namespace, inf, predictor, paths: list[str], k: int):
    """Predictions in input order: large images one by one through the streaming forward, the rest batched."""
    from ..inference.gigapixel import predict_large, stream_model
    from ..inference.predict import torch_threads

    large = [streamed(args, p) for p in paths]
    batched = iter(predictor.predict(
        [p for p, big in zip(paths, large) if not big], top_k=k, batch_size=args.batch_size, threads=args.threads,
        progress=not args.no_progress,
    ))
    stream = stream_model(inf, args.tokens_per_chunk) if any(large) else None
    for path, big in zip(paths, large):
        if not big:
            yield next(batched)
            continue
        with torch_threads(args.threads):
            yield predict_large(stream, inf.classes, path, k)
