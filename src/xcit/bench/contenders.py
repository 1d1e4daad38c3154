"""The contenders of ``xcit bench``: this project's XCiT (plain and ``xcit.optimize``), timm's XCiT with the
same weights, a matched ViT, and ONNX Runtime / OpenVINO on this project's export; runners that time
them (inference, training step) and their FLOPs.

The roofline preset adds, per precision: this project's best path (:func:`best_path`, the one place
that chooses it), timm + Inductor (:func:`inductor_runner`), and OpenVINO (f32 / bf16, NNCF int8) and
ONNX Runtime (fp32, static int8) on this project's ONNX export and on timm's (:func:`runtime_runners`),
all int8 contenders calibrated on the same images (:func:`calibration_set`).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path


def perturb_bn(model, generator=None) -> None:
    """BatchNorm running statistics away from their init (mean ~ N(0, 0.1), var in [0.5, 1.5))."""
    import torch

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def perturb(model, seed: int = 0, noise: float = 0.02):
    """Every parameter and BatchNorm statistic away from its (often trivial) init, so no layer hides an error:
    LayerScale gammas and XCA temperatures drawn in [0.5, 1), other parameters plus ``noise`` x N(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or "temperature" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    perturb_bn(model, g)
    return model


def build(impl: str, model_name: str, train: bool = False):
    """A model for ``impl`` in {this, this-fused, timm, vit}; XCiTs share seed-0 weights."""
    import torch

    from ..models import MODELS, create_model, resolve_name

    arch = resolve_name(model_name).arch
    if impl == "vit":
        from timm.models.vision_transformer import VisionTransformer

        spec = MODELS[arch]
        torch.manual_seed(0)
        model = VisionTransformer(img_size=224, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                                  num_heads=max(1, spec.embed_dim // 64), dynamic_img_size=True, num_classes=1000)
        return model.train(train)
    torch.manual_seed(0)
    ours = create_model(arch)
    perturb_bn(ours)
    if impl == "timm":
        import timm
        from timm.models.xcit import checkpoint_filter_fn

        ref = timm.create_model(arch + "_224", pretrained=False)
        ref.load_state_dict(checkpoint_filter_fn({"model": ours.state_dict()}, ref))
        return ref.train(train)
    ours.train(train)
    if impl == "this-fused":
        from ..models import optimize

        return optimize(ours)
    return ours


def model_flops(impl: str, model_name: str, res: int, batch: int, executed: bool = False) -> float:
    """FLOPs of one forward pass (torch.utils.flop_counter on the meta device).

    XCiT: the reference algorithm (the plain model), the same for this project and timm; with
    ``executed`` the optimised model's own count (fewer after folding), matmuls through ATen.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build("vit" if impl == "vit" else "this-fused" if executed else "this", model_name).eval()
        x = torch.empty(batch, 3, res, res)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def forward_runner(model, x, autocast=None):
    import torch

    def run():
        with torch.inference_mode():
            if autocast is None:
                return model(x)
            with torch.autocast("cpu", dtype=autocast):
                return model(x)

    return run


def deployment_runners(model, workdir: Path, threads: int) -> tuple[dict, list[str]]:
    """Runtimes a CPU deployer would pick instead, on this project's own ONNX export of ``model``.

    Returns ({label: make_run(x)}, notes): ``onnxruntime-fp32`` and ``openvino-fp32`` (OpenVINO IR read
    from the same file, fp32 inference precision), each with ``threads`` threads; a runtime that is not
    installed is left out with a note (``pip install 'xcit[export,openvino]'``).
    """
    import importlib.util

    from .. import export as ex

    notes: list[str] = []
    if importlib.util.find_spec("onnxruntime") is None and importlib.util.find_spec("openvino") is None:
        return {}, ["ONNX Runtime and OpenVINO not installed: their rows were skipped (pip install 'xcit[export,openvino]')"]
    onnx_path = ex.export_onnx(model, workdir / "model.onnx", example_size=(224, 224), exporter="torchscript")
    runners = {}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        runners["onnxruntime-fp32"] = lambda x: (lambda: session.run(None, {ex.INPUT_NAME: x.numpy()}))
    else:
        notes.append("ONNX Runtime not installed: its rows were skipped (pip install 'xcit[export]')")
    if importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        xml = ex.export_openvino(onnx_path, workdir / "model.xml")
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                             "INFERENCE_NUM_THREADS": threads})
        runners["openvino-fp32"] = lambda x: (lambda: compiled(x.numpy()))
    else:
        notes.append("OpenVINO not installed: its rows were skipped (pip install 'xcit[openvino]')")
    return runners, notes


def train_step_runner(model, x, y, autocast=None, optimizer=None):
    """One training step: forward and cross-entropy (under ``autocast`` when given), backward, AdamW.

    ``optimizer(params)`` makes the optimiser; default torch's ``AdamW`` with its default kernels (what a
    timm user gets); this project's tasks use :func:`xcit.train.optim.adamw` (the fused kernel).
    """
    import contextlib

    import torch

    opt = optimizer(model.parameters()) if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return run


def tokens(res: int, patch: int) -> int:
    return math.ceil(res / patch) ** 2


def self_times(run) -> dict[str, float]:
    """Seconds of self CPU time per profiler operator in one profiled call of ``run()``."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = prof.key_averages()
    return {ev.key: ev.self_cpu_time_total / 1e6 for ev in events}


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 sent to /dev/null: kineto logs ``profiler_start`` / ``profiler_stop`` and, on CUDA builds
    without a GPU, a ``gpuGetDeviceCount failed`` line from C++ on every profile, which Python cannot filter.
    Python's own exceptions are unaffected (they propagate, and print after the block)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        _flush_c_streams()  # kineto's lines sit in C stdio buffers until flushed
        os.dup2(saved, 2)
        os.close(saved)


def _flush_c_streams() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C library to flush (not Linux / macOS)
        pass


def profile_breakdown(model, x) -> dict:
    """Self CPU time of one profiled forward by operator class (GEMM, convolution, norm, other)."""
    import torch

    with torch.inference_mode():
        model(x)
        times = self_times(lambda: model(x))
    groups = {"gemm": ("linear", "addmm", "aten::mm", "bmm", "matmul"),
              "conv": ("conv",), "norm": ("layer_norm", "batch_norm", "vector_norm"), "softmax": ("softmax",)}
    out = {k: 0.0 for k in (*groups, "other")}
    for key, t in times.items():
        group = next((g for g, keys in groups.items() if any(k in key for k in keys)), "other")
        out[group] += t
    out["total"] = sum(times.values())
    return out


#: Profiler operators that carry the model's FLOPs: GEMMs, batched products and convolutions, forward and backward,
#: plain or oneDNN-fused (their fused GELU / residual / requantisation epilogues included), float or int8.
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::mkldnn_convolution",
               "aten::convolution_backward", "aten::_convolution", "aten::convolution", "aten::_nnpack_spatial_convolution",
               "mkldnn::_linear_pointwise", "mkldnn::_convolution_pointwise", "onednn::qlinear_pointwise",
               "onednn::qconv_pointwise", "onednn::qconv2d_pointwise")


def products_profile(run, repeats: int = 2) -> dict:
    """How long the products of ``run()`` take: the self CPU time of :data:`PRODUCT_OPS` in one profiled call.

    Of ``repeats`` profiled calls, the one whose products took least. The model's FLOPs over that time bound
    the share of peak ``run`` can reach with the same product kernels: the share if everything else (norms,
    softmax, GELU, casts, copies, quantisation, the optimiser step) took no time. Returns ``products_s``,
    ``profiled_s`` (every operator's self time in that call) and ``ops`` (seconds per product operator).
    """
    best = None
    for _ in range(repeats):
        times = self_times(run)
        ops = {k: t for k, t in times.items() if k in PRODUCT_OPS}
        products = sum(ops.values())
        if best is None or products < best["products_s"]:
            best = {"products_s": products, "profiled_s": sum(times.values()), "ops": ops}
    return best


# -- the roofline preset ----------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "int8")


def best_path(model, precision: str, calibration=None, *, train: bool = False):
    """This project's fastest path at ``precision``, the one place that chooses it.

    Returns ``make(x, y=None)``, which returns a no-argument callable running one batch ``x``:

    * inference (``model``: the plain model in eval mode, not modified): ``fp32``: ``xcit.optimize(model)``;
      ``bf16``: ``xcit.optimize(model, dtype=torch.bfloat16)`` (bf16 weights pre-packed for oneDNN, the blocks
      under bf16 autocast; called without the caller's autocast); ``int8``:
      ``xcit.quantize(model, calibration, batch_size=len(x))`` (activation ranges measured on the
      ``calibration`` images: pass them at the size it will run at; compiled for the batch it runs; int8 products
      with bf16 between them where the CPU has bf16 instructions);
    * ``train=True`` (``model``: the plain model in train mode, updated by the steps): forward, cross-entropy
      against the labels ``y``, backward and a step of the AdamW every task of this project trains with
      (:func:`xcit.train.optim.adamw`: torch's fused kernel), in fp32 or under bf16 autocast.
    """
    import torch

    from ..models import optimize, quantize
    from ..train.optim import adamw

    if precision not in PRECISIONS or (train and precision == "int8"):
        raise ValueError(f"expected a precision in {('fp32', 'bf16') if train else PRECISIONS}, got {precision!r}")
    autocast = torch.bfloat16 if precision == "bf16" else None
    if train:
        return lambda x, y: train_step_runner(model, x, y, autocast, optimizer=lambda p: adamw([{"params": list(p)}], 1e-4))
    if precision == "int8":
        if calibration is None:
            raise ValueError("the int8 path needs calibration images")
        # compiled at the first call's batch size: the first shape gets code for exactly that shape
        return lambda x, y=None: forward_runner(quantize(model, calibration, batch_size=len(x)), x)
    fast = optimize(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    return lambda x, y=None: forward_runner(fast, x)


def inductor_runner(model, x, autocast=None, *, y=None, freezing: bool = True):
    """``torch.compile(model)`` (Inductor, static shapes): inference with ``freezing`` (weights folded into the
    graph as constants), or with labels ``y`` a training step (:func:`train_step_runner`, freezing off).
    Compiles at the first call."""
    import torch
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)
    if y is not None:
        return train_step_runner(compiled, x, y, autocast)
    step = forward_runner(compiled, x, autocast)

    def run():
        with inductor_config.patch(freezing=freezing):
            return step()

    return run


def calibration_set(n: int, size: int, in_chans: int = 3) -> tuple:
    """The calibration images of every int8 contender: (images (n, in_chans, size, size), description).

    ``n`` Fashion-MNIST training images (fixed seed; grey replicated to ``in_chans`` channels, bicubic to
    ``size``, ImageNet normalisation) where the dataset is installed, else ``n`` standard-normal images."""
    import torch

    from ..data import IMAGENET_MEAN, IMAGENET_STD, BatchEvalTransform, calibration_images, folder_eval_transform

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    transform = BatchEvalTransform(size, crop_pct=1.0, mean=mean, std=std)
    try:
        images = calibration_images("fashion-mnist", n, in_chans=in_chans, batch_transform=transform,
                                    image_transform=folder_eval_transform(size, crop_pct=1.0, mean=mean, std=std))
        return images.contiguous(), (f"{n} Fashion-MNIST training images (seed 0), grey to {in_chans} channels, "
                                     f"bicubic to {size}x{size}, ImageNet normalisation")
    except (FileNotFoundError, OSError, ValueError) as err:
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(n, in_chans, size, size, generator=gen),
                f"{n} standard-normal images of {size}x{size} (Fashion-MNIST not available: {str(err)[:120]})")


def export_timm_onnx(model, path: Path, example_size: tuple[int, int] = (224, 224)) -> Path:
    """timm's model as ONNX the way this project exports its own (``xcit.export.export_onnx`` with the
    torchscript exporter): opset, input / output names, dynamic batch, height and width, constant folding."""
    import warnings

    import torch

    from .. import export as ex

    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, 3, *example_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=False, input_names=[ex.INPUT_NAME], output_names=[ex.OUTPUT_NAME],
                          dynamic_axes={ex.INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, ex.OUTPUT_NAME: {0: "batch"}},
                          opset_version=ex.DEFAULT_OPSET, do_constant_folding=True)
    return path


RUNTIMES = ("openvino", "onnxruntime")
#: What each runtime runs at each precision (the report's contender descriptions).
RUNTIME_SETUP = {
    ("openvino", "fp32"): "OpenVINO CPU, IR read from the ONNX file, reshaped to the static input shape; "
                          "INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = threads",
    ("openvino", "bf16"): "as fp32 with INFERENCE_PRECISION_HINT bf16",
    ("openvino", "int8"): "NNCF post-training quantisation of the IR (nncf.quantize, model_type TRANSFORMER, "
                          "calibration images at batch 1, subset_size = their number), then as fp32 (f32 hint for "
                          "the operations left in float)",
    ("onnxruntime", "fp32"): "ONNX Runtime CPUExecutionProvider, graph optimisation level ALL (default), "
                             "intra_op_num_threads = threads, inter_op_num_threads 1",
    ("onnxruntime", "int8"): "onnxruntime.quantization.quantize_static: QDQ format, per-channel int8 weights, uint8 "
                             "activations, MinMax calibration, MatMul / Conv / Gemm quantised; then as fp32",
}


def runtime_runners(onnx_path: Path, precision: str, shape: tuple[int, ...], threads: int, workdir: Path,
                    calibration=None, runtimes: tuple[str, ...] = RUNTIMES) -> tuple[dict, dict]:
    """OpenVINO and ONNX Runtime on one ONNX file at ``precision`` (:data:`RUNTIME_SETUP`).

    Returns ({runtime: make(x) -> run}, {runtime: why it was left out}): a runtime not installed, a precision
    it has no CPU path for (ONNX Runtime bf16; OpenVINO bf16 where the CPU lacks bf16), or a setup that
    failed. ``shape``: the input shape the runners will be called with; ``calibration``: int8 images
    (N, C, H, W) at that H, W; ``runtimes``: which of :data:`RUNTIMES` to set up."""
    import importlib.util

    from .. import export as ex

    runners, skipped = {}, {}
    name = ex.INPUT_NAME
    if "openvino" not in runtimes:
        pass
    elif importlib.util.find_spec("openvino") is None:
        skipped["openvino"] = "OpenVINO not installed (pip install 'xcit[openvino]')"
    else:
        try:
            import openvino as ov

            core = ov.Core()
            if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                skipped["openvino"] = "this CPU has no bf16 support in OpenVINO"
            elif precision == "int8" and importlib.util.find_spec("nncf") is None:
                skipped["openvino"] = "NNCF not installed (pip install 'xcit[openvino]')"
            else:
                model = core.read_model(str(onnx_path))
                if precision == "int8":
                    import logging

                    import nncf

                    model.reshape({model.inputs[0]: [1, *shape[1:]]})
                    data = nncf.Dataset([calibration[i:i + 1].numpy() for i in range(len(calibration))])
                    nncf.set_log_level(logging.ERROR)  # its INFO lines narrate every step
                    model = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
                model.reshape({model.inputs[0]: list(shape)})
                config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                          "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
                compiled = core.compile_model(model, "CPU", config)
                runners["openvino"] = lambda x: (lambda: compiled(x.numpy()))
        except Exception as err:  # noqa: BLE001 - one contender's failure is recorded, the run goes on
            skipped["openvino"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
    if "onnxruntime" not in runtimes:
        pass
    elif importlib.util.find_spec("onnxruntime") is None:
        skipped["onnxruntime"] = "ONNX Runtime not installed (pip install 'xcit[export]')"
    elif precision == "bf16":
        skipped["onnxruntime"] = "ONNX Runtime has no bf16 path on the CPU"
    else:
        try:
            import onnxruntime as ort

            path = onnx_path
            if precision == "int8":
                path = _ort_int8(onnx_path, workdir / f"{onnx_path.stem}-int8-{shape[-2]}x{shape[-1]}.onnx", calibration)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            runners["onnxruntime"] = lambda x: (lambda: session.run(None, {name: x.numpy()}))
        except Exception as err:  # noqa: BLE001
            skipped["onnxruntime"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
    return runners, skipped


def _ort_int8(onnx_path: Path, out: Path, calibration) -> Path:
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .. import export as ex

    class Reader(CalibrationDataReader):
        def __init__(self):
            step = 8
            self.batches = iter([{ex.INPUT_NAME: calibration[i:i + step].numpy()} for i in range(0, len(calibration), step)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()  # the quantiser warns once per shape tensor it cannot infer: thousands of lines
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Conv", "Gemm"])
    finally:
        root.setLevel(level)
    return out
