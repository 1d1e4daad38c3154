"""`xcit export`: ONNX and torch.export programs with dynamic batch, height and width, checked for parity."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..data.outputs import claim_folder
from ..models.quantize import DEFAULT_CALIBRATION_IMAGES
from .config import POSITIVE, add_config_option, number
from .predict import add_model_options, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="ONNX / torch.export (.pt2) with dynamic batch and image size, plus a preprocessing JSON",
        description=(
            "Write DIR/NAME.onnx and DIR/NAME.pt2 (dynamic batch, height and width; input 'image', output "
            "'logits') and DIR/NAME.json (class names, input size, mean/std), then compare each with PyTorch "
            "at three input sizes. Refuses to write over an earlier export of the same NAME (NAME.onnx, "
            "NAME.onnx.data, NAME.pt2, NAME.json) unless --overwrite, which first removes all of them so that "
            "old and new files never mix. --int8 writes the post-training int8 model instead (NAME.pt2 and "
            "NAME.json; calibrated on --calibration DATA, checked against the in-memory int8 model)."
        ),
    )
    add_model_options(p)
    p.add_argument("--output", "-o", dest="output", default="exported", metavar="DIR", help="default: exported")
    p.add_argument("--output-dir", dest="output", help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help="file stem (default: the checkpoint's or model's name)")
    p.add_argument("--formats", nargs="+", choices=["onnx", "pt2", "openvino"], default=None,
                   help="default: onnx pt2 (pt2 with --int8); openvino writes NAME.xml + NAME.bin from the ONNX file "
                        "(needs openvino)")
    p.add_argument("--optimize", action="store_true",
                   help="export the inference transform (xcit.optimize: folded weights, fused kernels) instead of the plain model")
    p.add_argument("--fuse", dest="optimize", action="store_true", help=argparse.SUPPRESS)  # the earlier spelling
    q = p.add_argument_group("int8 (post-training quantisation, xcit.quantize; needs torchao)")
    q.add_argument("--int8", action="store_true",
                   help="export the int8 model instead (PT2E, x86 Inductor quantizer): NAME.pt2 only, dynamic batch, "
                        "height and width (calibrated at the eval size); torch.compile it with freezing on to get int8 kernels (docs/performance.md)")
    q.add_argument("--calibration", default=None, metavar="DATA",
                   help="calibration images: fashion-mnist, digits, an IDX folder, a folder with SPLIT/ class folders, "
                        "or a folder of images (required with --int8)")
    q.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                   help=f"images drawn (fixed seed) from DATA to calibrate on (default {DEFAULT_CALIBRATION_IMAGES})")
    q.add_argument("--calibration-split", default="train", metavar="SPLIT",
                   help="the split of a dataset to draw from (default train)")
    p.add_argument("--opset", type=number(int, 7), default=None, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="ONNX exporter: dynamo (torch.export-based, needs onnxscript) or torchscript; auto prefers dynamo")
    p.add_argument("--img-size", type=POSITIVE, nargs="+", default=None, metavar="PX",
                   help="example / check size H [W] (default: the checkpoint's eval size, else 224)")
    p.add_argument("--atol", type=number(float, 0), default=1e-4, help="parity tolerance on the logits (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (onnxruntime / loaded program vs PyTorch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of the same NAME in DIR (its files are removed first)")
    add_config_option(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .. import export as ex

    out = Path(args.output)
    stem = _stem(args)
    _check_int8_options(args)
    earlier = _earlier_export(out, stem, args.overwrite)  # refused here, before any work
    claim_folder(out)  # a file, or a folder that cannot be written: refused before any work too
    inf = load_model(args, img_size=args.img_size)
    if args.int8:
        return _run_int8_export(args, inf, out, stem, earlier)
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
    formats = sorted(set(args.formats or ["onnx", "pt2"]), key=["onnx", "pt2", "openvino"].index)  # OpenVINO reads the ONNX file
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
            ok &= _report_parity(rows, f"{fmt} vs PyTorch", args.atol)
            sidecar.setdefault("parity", {})[fmt] = rows
    if scratch is not None:
        scratch.cleanup()
    return _finish(out / f"{stem}.json", sidecar, ok, args.atol)


def _report_parity(rows: list[dict], what: str, atol: float) -> bool:
    """Print one line per checked size; whether every difference is within ``atol``."""
    ok = True
    for r in rows:
        good = r["max_abs_diff"] <= atol
        ok &= good
        print(f"  {what}, batch {r['batch']} {r['height']}x{r['width']}: "
              f"max |diff| {r['max_abs_diff']:.2e} {'ok' if good else f'ABOVE {atol:g}'}")
    return ok


def _finish(meta: Path, sidecar: dict, ok: bool, atol: float) -> int:
    """Write the sidecar JSON; exit status 1 when a parity check failed."""
    meta.write_text(json.dumps(sidecar, indent=1))
    print(f"wrote {meta} (preprocessing and class names)")
    if not ok:
        print(f"parity check failed: some differences exceed {atol:g}", file=sys.stderr)
    return 0 if ok else 1


def _check_int8_options(args: argparse.Namespace) -> None:
    """Refuse option combinations that --int8 cannot honour, before any work."""
    if not args.int8:
        if args.calibration is not None:
            raise ValueError("--calibration is for --int8 exports; add --int8 or drop --calibration")
        return
    if args.calibration is None:
        raise ValueError("--int8 needs calibration images: --calibration DATA (e.g. the training data)")
    if args.calibration_images < 1:
        raise ValueError(f"expected --calibration-images >= 1, got {args.calibration_images}")
    if args.optimize:
        raise ValueError("--int8 quantises the plain model; drop --optimize (the int8 program is faster than the optimised one)")
    other = sorted(set(args.formats or []) - {"pt2"})
    if other:
        raise ValueError(f"--int8 writes a torch.export program (pt2) only, not {' / '.join(other)}: "
                         "export those formats without --int8")


def _run_int8_export(args: argparse.Namespace, inf, out: Path, stem: str, earlier: list[Path]) -> int:
    """--int8: calibrate, quantise (no compile: the Q/DQ program is what is saved), write NAME.pt2 and NAME.json."""
    import torch

    from .. import export as ex
    from ..models import quantize
    from ..models.quantize import agreement

    if inf.model.patch_size >= min(inf.img_size):
        raise ValueError(f"expected an eval size above the patch size {inf.model.patch_size}, got {inf.img_size}")
    images = inf.calibration_images(args.calibration, args.calibration_images, split=args.calibration_split)
    print(f"calibrating on {len(images)} images from {args.calibration} ({args.calibration_split}), "
          f"{inf.img_size[0]}x{inf.img_size[1]}")
    qmodel = quantize(inf.model.cpu().eval(), images, compile=False)
    for path in earlier:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    path = ex.export_quantized_program(qmodel, out / f"{stem}.pt2")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, int8)")
    sample = images[:64]
    with torch.no_grad():
        ref, got = inf.model(sample), qmodel(sample)
    agree = agreement(ref, got)
    print(f"  int8 vs fp32 on {len(sample)} calibration images: top-1 agreement {agree:.1f}%, "
          f"max |logit diff| {float((ref - got).abs().max()):.3f}")
    sidecar = {
        **inf.sidecar(), "optimized": False, "input": ex.INPUT_NAME, "output": ex.OUTPUT_NAME,
        "layout": "NCHW float32, normalised: (pixel / 255 - mean) / std", "pt2": path.name,
        "int8": {"method": "PT2E static, torchao X86InductorQuantizer (uint8 activations per tensor, int8 weights "
                           "per channel)", "calibration": str(args.calibration), "split": args.calibration_split,
                 "images": len(images), "calibration_size": list(inf.img_size),
                 "dynamic": ["batch", "height", "width"],
                 "calibration_agreement": agree,
                 "load": "import torch, torchao; torch.export.load(PT2).module(); for int8 kernels torch.compile it "
                         "under torch._inductor.config.patch(freezing=True)"},
    }
    ok = True
    if not args.no_check:
        rows = ex.check_quantized_program(qmodel, path)
        ok = _report_parity(rows, "pt2 vs PyTorch int8", args.atol)
        sidecar["parity"] = {"pt2": rows}
    return _finish(out / f"{stem}.json", sidecar, ok, args.atol)


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
                              "give --overwrite to replace it, or another --output / --name")
    return existing
