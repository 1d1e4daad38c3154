"""The contenders of ``xcit bench``: this project's XCiT (plain and ``xcit.optimize``), timm's XCiT with the
same weights, a matched ViT, and ONNX Runtime / OpenVINO on this project's export; runners that time
them (inference, training step) and their FLOPs."""
from __future__ import annotations

import math
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


def train_step_runner(model, x, y):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return run


def tokens(res: int, patch: int) -> int:
    return math.ceil(res / patch) ** 2


def profile_breakdown(model, x) -> dict:
    """Self CPU time of one profiled forward by operator class (GEMM, convolution, norm, other)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    groups = {"gemm": ("linear", "addmm", "aten::mm", "bmm", "matmul"),
              "conv": ("conv",), "norm": ("layer_norm", "batch_norm", "vector_norm"), "softmax": ("softmax",)}
    out = {k: 0.0 for k in (*groups, "other")}
    total = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6
        total += t
        for g, keys in groups.items():
            if any(k in ev.key for k in keys):
                out[g] += t
                break
        else:
            out["other"] += t
    out["total"] = total
    return out
