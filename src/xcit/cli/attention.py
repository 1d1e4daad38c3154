"""`xcit attention`: per-head class-attention maps (and optionally XCA channel attention) as PNGs."""
from __future__ import annotations

import argparse

from .config import NON_NEGATIVE, POSITIVE, add_config_option, add_overwrite_option, number
from .predict import add_model_options, add_streaming_options, load_model, streamed
from .unreadable import Unreadable, add_policy


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="PNG per image: the input and each head's class attention overlaid",
        description=(
            "For each image, write OUT/<name>_attention.png: the input and, for each head of a class-attention "
            "layer (the last by default), the cls-to-patch attention upsampled and overlaid. With --xca-block, "
            "also OUT/<name>_xca<B>.png: the d x d channel attention of XCA block B per head. Any input size. Images "
            "above --large-pixels (large TIFF / PNG) go whole, at native resolution, through the exact bounded-memory "
            "streaming forward: OUT/<name>_attention.npy (heads x Hp x Wp, memory-mappable), the figure on a "
            "downsampled copy and OUT/<name>_attention_map.png (mean of heads over the downsampled image)."
        ),
    )
    add_policy(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files")
    add_model_options(p)
    p.add_argument("--output", "-o", dest="output", default="attention_maps", metavar="DIR", help="where PNGs go (default attention_maps)")
    p.add_argument("--output-dir", dest="output", help=argparse.SUPPRESS)
    add_overwrite_option(p, "replace files of an earlier run in DIR (NAME_attention.png, ...)")
    p.add_argument("--img-size", type=NON_NEGATIVE, default=None, metavar="PX",
                   help="resize the short side to PX keeping the aspect ratio (0: native size; "
                        "default: the checkpoint's eval size, else 224)")
    p.add_argument("--layer", type=int, default=-1, help="class-attention layer index (default -1: the last)")
    p.add_argument("--xca-block", type=int, action="append", default=[], metavar="B",
                   help="also plot the channel attention of XCA block B (0-based, negative from the end); repeatable")
    p.add_argument("--raw", action="store_true",
                   help="plot the raw softmax weights (which also weigh the cls token) instead of maps renormalised over patches")
    p.add_argument("--cmap", default="inferno", help="matplotlib colour map of the overlays (default inferno)")
    p.add_argument("--alpha", type=number(float, 0, 1), default=0.6, help="overlay opacity (default 0.6)")
    p.add_argument("--dpi", type=number(int, 1, 2400), default=100)
    p.add_argument("--palette", action="store_true", help="256-colour PNGs (about 3x smaller, for documentation)")
    add_streaming_options(p)
    p.add_argument("--thumbnail", type=POSITIVE, default=2048, metavar="PX",
                   help="streamed images: long side of the downsampled PNGs (default 2048)")
    add_config_option(p)
    p.set_defaults(func=run_attention)


def run_attention(args: argparse.Namespace) -> int:
    from ..data.images import display_path
    from ..data.outputs import claim_files, claim_folder, unique_stems
    from ..viz.gigapixel import large_attention_files
    from ..viz.pipeline import attention_files, render_attention

    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"expected --alpha in [0, 1], got {args.alpha}")
    if args.img_size is not None and args.img_size < 0:
        raise ValueError(f"expected --img-size >= 0, got {args.img_size}")
    from matplotlib import colormaps

    if args.cmap not in colormaps:
        raise ValueError(f"expected --cmap to name a matplotlib colour map (e.g. inferno, viridis, magma), "
                         f"got {args.cmap!r}")
    claim_folder(args.output)
    inf = load_model(args)
    n_cls, depth = len(inf.model.cls_attn_blocks), len(inf.model.blocks)
    if not -n_cls <= args.layer < n_cls:
        raise ValueError(f"expected --layer in [{-n_cls}, {n_cls - 1}] (the model has {n_cls} class-attention layers), "
                         f"got {args.layer}")
    bad = [b for b in args.xca_block if not -depth <= b < depth]
    if bad:
        raise ValueError(f"expected --xca-block in [{-depth}, {depth - 1}] (the model has {depth} XCA blocks), "
                         f"got {bad[0]}")
    short_side = min(inf.img_size) if args.img_size is None else (args.img_size or None)
    on_error = Unreadable("attention")
    stems = dict(zip(args.inputs, unique_stems(args.inputs)))
    large = [path for path in args.inputs if streamed(args, path)]
    if large and args.xca_block:
        raise ValueError("expected no --xca-block with streamed (large) images: their XCA attention is not recorded")
    blocks = [b % depth for b in args.xca_block]
    names = [n for path in args.inputs for n in (large_attention_files(stems[path]) if path in large
                                                  else attention_files(stems[path], blocks))]
    claim_files(args.output, names, overwrite=args.overwrite)  # every file, before any image is read
    _render_large(args, inf, large, stems, on_error)
    small = [path for path in args.inputs if path not in large]
    for result in render_attention(
        inf, small, args.output, short_side=short_side, cls_layer=args.layer, xca_blocks=args.xca_block,
        renormalise=not args.raw, cmap=args.cmap, alpha=args.alpha, dpi=args.dpi, palette=args.palette,
        device=next(inf.model.parameters()).device, on_error=on_error, stems=[stems[p] for p in small],
        overwrite=args.overwrite,
    ):
        label, prob = result.top[0]
        hp, wp = result.maps.grid
        files = ", ".join(display_path(f) for f in result.figures)
        print(f"{display_path(result.path)}: {wp}x{hp} patches (W x H), top-1 {label} ({100 * prob:.1f}%) -> {files}")
    return on_error.finish(len(args.inputs))


def _render_large(args: argparse.Namespace, inf, paths: list[str], stems: dict[str, str], on_error) -> None:
    from ..data.images import display_path
    from ..viz.gigapixel import render_large_attention

    for path in paths:
        try:
            result = render_large_attention(
                inf, path, args.output, stem=stems[path], cls_layer=args.layer, renormalise=not args.raw,
                thumbnail=args.thumbnail, cmap=args.cmap, alpha=args.alpha, dpi=args.dpi, palette=args.palette,
                tokens_per_chunk=args.tokens_per_chunk, overwrite=args.overwrite,
            )
        except ValueError as err:
            on_error(path, str(err))
            continue
        (h, w), (hp, wp) = result.size, result.grid
        label, prob = result.top[0]
        files = ", ".join(display_path(f) for f in result.files)
        print(f"{display_path(path)}: {w}x{h} px, {wp}x{hp} patches (W x H), streamed, top-1 {label} "
              f"({100 * prob:.1f}%) -> {files}")
