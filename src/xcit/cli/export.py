"""`xcit export`: ONNX and torch.export programs with dynamic batch, height and width, checked for parity."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .config import add_config_option
from .predict import add_model_options, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="ONNX / torch.export (.pt2) with dynamic batch and image size, plus a preprocessing JSON",
        description=(
            "Write DIR/NAME.onnx and DIR/NAME.pt2 (dynamic batch, height and width; input 'image', output "
            "'logits') and DIR/NAME.json (class names, input size, mean/std), then compare each with PyTorch "
            "at three input sizes. Refuses to write over an earlier export of the same NAME (NAME.onnx, "
            "NAME.onnx.data, NAME.pt2, NAME.json) unless --overwrite, which first removes all of them so that "
            "old and new files never mix."
        ),
    )
    add_model_options(p)
    p.add_argument("--output", "-o", dest="output", default="exported", metavar="DIR", help="default: exported")
    p.add_argument("--output-dir", dest="output", help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help="file stem (default: the checkpoint's or model's name)")
    p.add_argument("--formats", nargs="+", choices=["onnx", "pt2", "openvino"], default=["onnx", "pt2"],
                   help="default: onnx pt2; openvino writes NAME.xml + NAME.bin from the ONNX file (needs openvino)")
    p.add_argument("--optimize", action="store_true",
                   help="export the inference transform (xcit.optimize: folded weights, fused kernels) instead of the plain model")
    p.add_argument("--fuse", dest="optimize", action="store_true", help=argparse.SUPPRESS)  # the earlier spelling
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="ONNX exporter: dynamo (torch.export-based, needs onnxscript) or torchscript; auto prefers dynamo")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="PX",
                   help="example / check size H [W] (default: the checkpoint's eval size, else 224)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on the logits (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (onnxruntime / loaded program vs PyTorch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of the same NAME in DIR (its files are removed first)")
    add_config_option(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .. import export as ex

    out = Path(args.output)
    stem = _stem(args)
    earlier = _earlier_export(out, stem, args.overwrite)  # refused here, before any work
    inf = load_model(args, img_size=args.img_size)
    model = ex.prepare_for_export(inf.model, optimize=args.optimize)
    for path in earlier:  # --overwrite: removed once the model is ready, so no old file survives beside new ones
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    size = inf.img_size
    sizes = ex.check_sizes(size, inf.model.patch_size)
    sidecar = {
        **inf.sidecar(), "optimized": args.optimize, "input": ex.INPUT_NAME, "output": ex.OUTPUT_NAME,
        "layout": "NCHW float32, normalised: (pixel / 255 - mean) / std", "min_size": inf.model.patch_size + 1,
    }
    ok = True
    formats = sorted(set(args.formats), key=["onnx", "pt2", "openvino"].index)  # OpenVINO reads the ONNX file
    scratch = tempfile.TemporaryDirectory() if "openvino" in formats and "onnx" not in formats else None
    onnx_path = None
    for fmt in formats:
        if fmt == "onnx" or (fmt == "openvino" and onnx_path is None):
            kind = ex.onnx_exporter(args.exporter)
            target = out / f"{stem}.onnx" if fmt == "onnx" else Path(scratch.name) / f"{stem}.onnx"
            onnx_path = ex.export_onnx(model, target, example_size=size, opset=args.opset or ex.DEFAULT_OPSET, exporter=kind)
            if fmt == "onnx":
                sidecar.update(onnx=onnx_path.name, onnx_exporter=kind, opset=args.opset or ex.DEFAULT_OPSET)
        if fmt == "onnx":
            path = onnx_path
            check = ex.check_onnx if not args.no_check else None
        elif fmt == "openvino":
            path = ex.export_openvino(onnx_path, out / f"{stem}.xml")
            sidecar.update(openvino=[path.name, path.with_suffix(".bin").name])
            check = ex.check_openvino if not args.no_check else None
        else:
            path = ex.export_program(model, out / f"{stem}.pt2", example_size=size)
            sidecar.update(pt2=path.name)
            check = ex.check_program if not args.no_check else None
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if check is not None:
            rows = check(model, path, sizes)
            for r in rows:
                good = r["max_abs_diff"] <= args.atol
                ok &= good
                print(f"  {fmt} vs PyTorch, batch {r['batch']} {r['height']}x{r['width']}: "
                      f"max |diff| {r['max_abs_diff']:.2e} {'ok' if good else f'ABOVE {args.atol:g}'}")
            sidecar.setdefault("parity", {})[fmt] = rows
    if scratch is not None:
        scratch.cleanup()
    meta = out / f"{stem}.json"
    meta.write_text(json.dumps(sidecar, indent=1))
    print(f"wrote {meta} (preprocessing and class names)")
    if not ok:
        print(f"parity check failed: some differences exceed {args.atol:g}", file=sys.stderr)
    return 0 if ok else 1


# Every file an export of NAME writes (ONNX puts weights beside the graph above 2 GB).
_SUFFIXES = (".onnx", ".onnx.data", ".pt2", ".xml", ".bin", ".json")


def _stem(args: argparse.Namespace) -> str:
    """The file stem: --name, else the checkpoint's file name, else the architecture's name."""
    from ..models import resolve_name

    if args.name:
        return args.name
    if args.checkpoint is not None:
        return Path(args.checkpoint).stem
    if args.model is None:
        raise ValueError("expected --checkpoint CKPT or --model NAME (random weights), got neither")
    return resolve_name(args.model).arch


def _earlier_export(out: Path, stem: str, overwrite: bool) -> list[Path]:
    """The files of an earlier export of ``stem`` in ``out``; ``FileExistsError`` if any exists without ``overwrite``."""
    existing = [out / f"{stem}{suffix}" for suffix in _SUFFIXES if (out / f"{stem}{suffix}").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds an export named {stem} ({', '.join(p.name for p in existing)}); "
                              "give --overwrite to replace it, or another --output-dir / --name")
    return existing
