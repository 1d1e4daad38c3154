"""`xcit embed`: cls and mean patch-token embeddings of whole images (any size) to one .npz file."""
from __future__ import annotations

import argparse

from .config import POSITIVE, add_config_option, add_overwrite_option
from .predict import add_input_options, add_model_options, input_images, load_model
from .unreadable import Unreadable, add_policy


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="cls and mean patch-token embeddings of whole images (slides, mosaics) to a .npz file",
        description=(
            "For each image, at its native resolution and whatever its size, the normalised cls token and the mean "
            "of the normalised patch tokens (forward_features), computed exactly by the bounded-memory streaming "
            "forward. Large TIFFs are memory-mapped. Writes OUT.npz with arrays paths (n), cls (n, C), "
            "mean_patch (n, C), grid (n, 2: Hp, Wp) and meta (JSON: model source, preprocessing)."
        ),
    )
    add_policy(p, ", and under \"unreadable\" in meta ([{path, error}])")
    add_input_options(p)
    add_model_options(p)
    p.add_argument("--output", "-o", default=None, metavar="FILE.npz", help="where the embeddings go (required)")
    add_overwrite_option(p, "replace an existing --output file")
    p.add_argument("--tokens-per-chunk", type=POSITIVE, default=16384, metavar="N",
                   help="tokens per chunk / tile, which bounds the temporaries (default 16384)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch threads")
    add_config_option(p)
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from ..inference.gigapixel import embed_images, stream_model
    from ..inference.predict import torch_threads

    from ..data.outputs import claim_file

    paths = input_images(args.inputs, args.lists)
    if args.output is None or not args.output.endswith(".npz"):
        raise ValueError(f"expected --output ending in .npz, got {args.output!r}")
    claim_file(args.output, overwrite=args.overwrite, inputs=[*paths, *args.lists, args.checkpoint])
    inf = load_model(args)
    stream = stream_model(inf, args.tokens_per_chunk)
    unreadable = Unreadable("embed")
    with torch_threads(args.threads):
        emb = embed_images(stream, paths, unreadable)
    meta = {"source": inf.source, "random_init": inf.random_init, "mean": list(inf.mean), "std": list(inf.std),
            "patch_size": inf.model.patch_size, "embed_dim": inf.model.embed_dim, "unreadable": unreadable.records()}
    out = emb.save(args.output, meta, overwrite=args.overwrite)
    print(f"{len(emb.paths)} of {len(paths)} image(s) embedded ({inf.model.embed_dim} channels) -> {out}")
    return unreadable.finish(len(paths))
