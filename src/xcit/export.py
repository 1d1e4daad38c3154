"""Deployment artefacts: ONNX and ``torch.export`` programs with dynamic batch, height and width.

Both take float32 images (B, C, H, W), normalised as the model's sidecar JSON says, of any batch
size and any H, W (not only multiples of the patch size), and return logits (B, num_classes).
:func:`check_onnx` / :func:`check_program` compare them with the PyTorch model at several sizes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18


class ExportError(ValueError):
    """A model that could not be exported with dynamic batch, height and width."""


def _example(model: nn.Module, size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_chans, *size, generator=gen)
    return x.to(ref.device, ref.dtype)


def _dims(patch_size: int) -> dict[int, torch.export.Dim]:
    """Dynamic batch, height and width (the same symbolic sizes as the int8 graph of :func:`xcit.quantize`)."""
    from .models.quantize import dynamic_dims

    return dynamic_dims(patch_size)


def _hint(model: nn.Module) -> str:
    from .models import is_optimized

    return " (an optimised model: try exporting the plain one)" if is_optimized(model) else ""


def prepare_for_export(model: nn.Module, optimize: bool = False) -> nn.Module:
    """The model in eval mode; with ``optimize`` its inference transform (:func:`xcit.optimize`)."""
    model = model.eval()
    if optimize:
        from .models import is_optimized
        from .models import optimize as optimize_model

        model = model if is_optimized(model) else optimize_model(model)
    return model


def onnx_exporter(exporter: str = "auto") -> str:
    """``dynamo`` (torch.export-based, needs ``onnxscript``) or ``torchscript``; ``auto`` prefers dynamo."""
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"expected exporter 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not has_onnxscript:
        raise ValueError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript (or 'xcit[export]')")
    if exporter == "auto":
        return "dynamo" if has_onnxscript else "torchscript"
    return exporter


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_size: tuple[int, int] = (224, 224),
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> Path:
    """Write ``model`` as ONNX with dynamic batch, height and width (input ``image``, output ``logits``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = _example(model, example_size)
    kind = onnx_exporter(exporter)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5e9  # ONNX protobuf limit is 2 GB
    log = io.StringIO()  # the dynamo exporter narrates its steps on stdout: shown only if it fails
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            if kind == "dynamo":
                torch.onnx.export(
                    model, (x,), path, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=(_dims(model.patch_size),), opset_version=opset, external_data=large,
                    optimize=True, verbose=False,
                )
            else:
                torch.onnx.export(
                    model, (x,), path, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset, do_constant_folding=True,
                )
    except Exception as err:
        sys.stderr.write("".join(log.getvalue().splitlines(keepends=True)[-30:]))
        raise ExportError(f"the {kind} ONNX exporter failed{_hint(model)}: {type(err).__name__}: {str(err)[:1200]}") from err
    _check_dynamic_onnx(path, kind)
    return path


def _check_dynamic_onnx(path: Path, kind: str) -> None:
    """Refuse an ONNX file whose batch, height or width came out fixed.

    When torch.export cannot trace dynamic sizes, the dynamo exporter may fall back to a trace that
    bakes in the example's sizes instead of failing; such a file is removed and reported.
    """
    try:
        import onnx
    except ImportError:  # the parity check still runs the file at other sizes
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    fixed = [name for name, d in zip(("batch", "channels", "height", "width"), dims) if name != "channels" and not isinstance(d, str)]
    if fixed:
        path.unlink()
        raise ExportError(
            f"the {kind} ONNX exporter produced fixed {', '.join(fixed)} (input shape {dims}): the model could "
            "not be traced with dynamic sizes. Try --exporter torchscript, or export without --optimize."
        )


def export_program(model: nn.Module, path: str | os.PathLike, *, example_size: tuple[int, int] = (224, 224)) -> Path:
    """Write a ``torch.export`` program (``.pt2``, load with ``torch.export.load``) with dynamic B, H, W."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        try:
            program = torch.export.export(model, (_example(model, example_size),), dynamic_shapes=(_dims(model.patch_size),))
        except Exception as err:
            if type(err).__name__ not in ("UserError", "ConstraintViolationError"):
                raise
            raise ExportError(
                "torch.export could not trace the model with dynamic batch, height and width"
                f"{_hint(model)}:\n{str(err)[:1500]}"
            ) from err
    torch.export.save(program, path)
    return path


def export_quantized_program(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write an int8 model's (:func:`xcit.quantize`) Q/DQ program as ``.pt2`` with dynamic batch, height and width.

    The program holds int8 weights with their scales and quantize / dequantize ops around float
    ops (``quantized_decomposed``, registered by ``import torchao``: import it before loading);
    ``torch.export.load(path).module()`` runs it in float emulation, and ``torch.compile`` with
    ``torch._inductor.config.freezing`` on turns it into oneDNN int8 kernels.
    """
    from .models import is_quantized

    if not is_quantized(model):
        raise ExportError(f"expected an int8 model made by xcit.quantize, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.in_chans, *model.img_size, generator=gen)
    with torch.no_grad():
        try:
            program = torch.export.export(model.program, (x,), dynamic_shapes=(_dims(model.patch_size),))
        except Exception as err:
            raise ExportError(f"torch.export could not trace the int8 program: {type(err).__name__}: {str(err)[:1200]}") from err
    torch.export.save(program, path)
    return path


def check_quantized_program(model: nn.Module, path: str | os.PathLike, batches: Sequence[int] = (1, 2, 3)) -> list[dict]:
    """Max |loaded int8 program - the int8 model's Q/DQ graph| of the logits at each batch size: the calibration
    H, W, and for the last batch size a larger one (one patch more each way), so the symbolic sizes are checked."""
    program = torch.export.load(os.fspath(path)).module()
    rows = []
    for i, b in enumerate(batches):
        h, w = model.img_size
        if i == len(batches) - 1:
            h, w = h + model.patch_size, w + model.patch_size
        x = torch.randn(b, model.in_chans, h, w, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref, out = model.program(x), program(x)
        if out.shape != ref.shape:
            raise AssertionError(f"exported int8 program gave shape {tuple(out.shape)} for batch {b}, expected {tuple(ref.shape)}")
        rows.append({"batch": b, "height": h, "width": w,
                     "max_abs_diff": float((out - ref).abs().max())})
    return rows


def export_openvino(onnx_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """OpenVINO IR (``.xml`` + ``.bin``, fp32 weights) of an exported ONNX file, dynamic sizes kept.

    Read by OpenVINO's own ONNX frontend (``Core.read_model``) rather than ``openvino.convert_model``,
    whose conversion tool may send usage telemetry over the network.
    """
    try:
        import openvino as ov
    except ImportError as err:
        raise ExportError("the OpenVINO format needs the openvino package: pip install openvino (or 'xcit[openvino]')") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.Core().read_model(os.fspath(onnx_path))
    ov.save_model(model, os.fspath(path), compress_to_fp16=False)
    return path


def check_sizes(img_size: tuple[int, int], patch_size: int) -> list[tuple[int, int, int]]:
    """Three (batch, H, W) test inputs: the eval size, a rectangular one, and one that is no multiple of the patch."""
    h, w = img_size
    p = patch_size

    def up(v: int) -> int:  # the next multiple of the patch size
        return max(p, math.ceil(v / p) * p)

    odd_h, odd_w = h + p // 2 + 1, max(p + 1, w - p // 2 - 1)
    if odd_h % p == 0:
        odd_h += 1
    if odd_w % p == 0:
        odd_w += 1
    return [(1, h, w), (2, up(h * 3 // 4), up(w * 5 // 4)), (3, odd_h, odd_w)]


def _max_diffs(model: nn.Module, run, sizes: Sequence[tuple[int, int, int]]) -> list[dict]:
    rows = []
    for b, h, w in sizes:
        x = _example(model, (h, w), batch=b)
        with torch.no_grad():
            ref = model(x).float().cpu()
        out = torch.as_tensor(run(x)).float().cpu()
        if out.shape != ref.shape:
            raise AssertionError(f"exported model gave shape {tuple(out.shape)} for input {(b, h, w)}, expected {tuple(ref.shape)}")
        rows.append({"batch": b, "height": h, "width": w, "max_abs_diff": float((out - ref).abs().max())})
    return rows


def check_onnx(model: nn.Module, path: str | os.PathLike, sizes: Sequence[tuple[int, int, int]], threads: int | None = None) -> list[dict]:
    """Max |onnxruntime - PyTorch| of the logits at each (batch, H, W) in ``sizes``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    return _max_diffs(model, lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0], sizes)


def check_program(model: nn.Module, path: str | os.PathLike, sizes: Sequence[tuple[int, int, int]]) -> list[dict]:
    """Max |loaded torch.export program - PyTorch| of the logits at each (batch, H, W) in ``sizes``."""
    program = torch.export.load(os.fspath(path)).module()

    def run(x):
        with torch.no_grad():
            return program(x)

    return _max_diffs(model, run, sizes)


def check_openvino(model: nn.Module, path: str | os.PathLike, sizes: Sequence[tuple[int, int, int]],
                   threads: int | None = None) -> list[dict]:
    """Max |OpenVINO (CPU, fp32 inference precision) - PyTorch| of the logits at each (batch, H, W)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO may pick bf16 on CPUs that have it
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(os.fspath(path), "CPU", config)
    return _max_diffs(model, lambda x: compiled(x.cpu().numpy())[0], sizes)
