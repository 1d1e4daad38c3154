"""`xcit models` (the model table) and `xcit info NAME` (one architecture at a chosen size)."""
from __future__ import annotations

import argparse

import torch

from .config import NON_NEGATIVE, POSITIVE, add_config_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="table of every architecture: parameters, GMACs at 224, paper top-1")
    p.add_argument("--filter", default="*", help="glob on the model name, e.g. '*_p16'")
    p.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    add_config_option(p)
    p.set_defaults(func=run_models)

    p = sub.add_parser("info", help="one architecture: layers, parameters and GMACs at a chosen resolution")
    p.add_argument("name", help="model name (official or timm style)")
    p.add_argument("--img-size", type=POSITIVE, nargs="+", default=[224], metavar="PX", help="H [W] (default 224)")
    p.add_argument("--in-chans", type=POSITIVE, default=3)
    p.add_argument("--num-classes", type=NON_NEGATIVE, default=1000)
    add_config_option(p)
    p.set_defaults(func=run_info)


def _meta_model(name: str, **kwargs):
    from ..models import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


def model_rows(pattern: str = "*") -> list[dict]:
    """One row per architecture: reference and measured numbers."""
    from ..models import MODELS, list_models
    from ..models.complexity import count_macs, count_params

    rows = []
    for name in list_models(pattern):
        spec = MODELS[name]
        model = _meta_model(name)
        rows.append({
            "model": name, "dim": spec.embed_dim, "depth": spec.depth, "heads": spec.num_heads,
            "patch": spec.patch_size, "params": count_params(model), "gmacs": count_macs(model) / 1e9,
            "top1": spec.top1[0], "top1_dist": spec.top1[1], "top1_384": spec.top1[2],
        })
    return rows


def format_table(rows: list[dict], fmt: str = "table") -> str:
    headers = ["model", "dim", "depth", "heads", "patch", "params (M)", "GMACs@224", "top-1", "dist", "dist@384"]
    cells = [[r["model"], r["dim"], r["depth"], r["heads"], r["patch"], f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.2f}",
              f"{r['top1']:.1f}", f"{r['top1_dist']:.1f}", f"{r['top1_384']:.1f}"] for r in rows]
    if fmt == "csv":
        return "\n".join(",".join(map(str, line)) for line in [headers] + cells)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *cells)]
    if fmt == "markdown":
        line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
        return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])
    line = lambda vals: "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def run_models(args: argparse.Namespace) -> int:
    rows = model_rows(args.filter)
    if not rows:
        raise ValueError(f"no model matches {args.filter!r}")
    print(format_table(rows, args.format))
    if args.format == "table":
        print("\nGMACs: torch.utils.flop_counter at 224x224 (FLOPs / 2). top-1: ImageNet-1k, official README "
              "(224 / 224 distilled / 384 distilled).")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..models import MODELS, resolve_name
    from ..models.complexity import count_macs, count_params

    if len(args.img_size) not in (1, 2):
        raise ValueError(f"--img-size takes H or H W, got {args.img_size}")
    h, w = (args.img_size * 2)[:2]
    resolved = resolve_name(args.name)
    spec = MODELS[resolved.arch]
    model = _meta_model(args.name, in_chans=args.in_chans, num_classes=args.num_classes)
    hp, wp = -(-h // spec.patch_size), -(-w // spec.patch_size)
    macs = count_macs(model, (h, w))
    print(f"{resolved.arch}  (weights tag: {resolved.weights}, default resolution {resolved.img_size})")
    print(f"  embed dim {spec.embed_dim}, depth {spec.depth} XCA + 2 class-attention blocks, {spec.num_heads} heads "
          f"(head dim {spec.embed_dim // spec.num_heads}), patch {spec.patch_size}, tokens_norm {spec.tokens_norm}")
    print(f"  parameters      {count_params(model):,}")
    print(f"  input           {args.in_chans}x{h}x{w} -> {hp}x{wp} = {hp * wp} tokens")
    print(f"  GMACs           {macs / 1e9:.3f}")
    print(f"  paper top-1     {spec.top1[0]} (224) / {spec.top1[1]} (224 dist) / {spec.top1[2]} (384 dist)")
    print(f"  drop path       {spec.drop_path_rate} (recipe preset for training this size)")
    return 0
