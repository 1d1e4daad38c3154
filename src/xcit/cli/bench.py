"""`xcit bench`: speed, peak memory and scaling of this XCiT against timm's XCiT and a matched ViT.

One process runs every timed comparison interleaved (A, B, C, A, B, C, ...) and reports medians
and paired ratios (the median over rounds of t_other / t_this); the machine's fp32 and bf16 matmul
peaks are measured in the same run. Peak memory is measured per configuration in a fresh
subprocess (Linux VmHWM after resetting it, minus the resident size before the forward pass).
Results: a markdown report (targets, tables, machine, command), a log-log PNG and a JSON file.

Contenders:
* ``this`` - this project, eager, the plain model (``this-fused``: its inference transform ``xcit.optimize``);
* ``timm`` - ``timm``'s XCiT with the same weights (its default, non-fused XCA path);
* ``vit``  - a DeiT-style ViT of the same width, depth and patch size (heads = C / 64) with
  torch's scaled-dot-product attention, timm's ``VisionTransformer`` (``dynamic_img_size``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .config import add_config_option

PRESETS = {
    # resolutions timed at batch 1 for the scaling curve; XCiT alone beyond ``vit_max``
    "full": dict(sizes=[224, 384, 512, 768, 1024, 1536, 2048, 3072, 4096], vit_max=2048, timm_max=4096, repeats=7,
                 large_repeats=3, compile=True, train=True, bf16=True, memory=True, profile=True),
    "quick": dict(sizes=[224, 512, 1024], vit_max=1024, timm_max=1024, repeats=3, large_repeats=2, compile=False,
                  train=True, bf16=True, memory=True, profile=False),
}
LARGE_TOKENS = 8192  # configurations with more tokens than this use ``large_repeats``


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="inference/training throughput, peak memory and scaling vs timm's XCiT and a ViT",
        description="Benchmark suite (see benchmarks/README.md). Writes a markdown report, a PNG plot and JSON.",
    )
    p.add_argument("--model", default="xcit_small_12_p16", help="XCiT architecture (default xcit_small_12_p16)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="scaling resolutions (batch 1); overrides the preset")
    p.add_argument("--batch", type=int, default=32, help="batch of the 224 comparisons (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default: preset)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. all cores)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter (default); cpu: process CPU time, with --threads 1 only - robust to other "
                        "processes competing for the cores on a shared machine")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparisons")
    p.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--bf16-checkpoint", default=None,
                   help="trained model (e.g. runs/.../model.pth) for the bf16/fp32 top-1 agreement on Fashion-MNIST")
    p.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown report")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out, scaling.png)")
    p.add_argument("--json", type=Path, default=None, help="raw results (default: next to --out, results.json)")
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only re-write the report and plot from an earlier run's results.json")
    p.add_argument("--appendix", type=Path, nargs="*", default=[], metavar="RESULTS_JSON",
                   help="with --render: append the summary and targets of other runs (e.g. a --clock cpu cross-check)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    add_config_option(p)
    p.set_defaults(func=run_bench)


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    label: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


CLOCK: Callable[[], float] = time.perf_counter


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Run the contenders in turn, ``warmup`` untimed rounds then ``repeats`` timed rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    out = {k: Timing(k) for k in contenders}
    for _ in range(repeats):
        for k, fn in contenders.items():
            t0 = CLOCK()
            fn()
            out[k].times.append(CLOCK() - t0)
    return out


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over rounds of num / den (how many times faster ``den`` is than ``num``)."""
    return statistics.median(a / b for a, b in zip(num.times, den.times))


# ------------------------------------------------------------------------------------------ machine


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    cpuinfo = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpuinfo = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        pass
    info["cpu"] = cpuinfo.get("Model name", platform.processor() or "unknown")
    flags = set(cpuinfo.get("Flags", "").split())
    info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
                               "avx_vnni") if f in flags]
    info["caches"] = {k: cpuinfo[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in cpuinfo}
    try:
        mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    config = torch.__config__.show()
    info["blas"] = "MKL" if "USE_MKL=ON" in config or "mkl" in config.lower() else "other"
    info["onednn"] = bool(torch.backends.mkldnn.is_available())
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["load_start"] = os.getloadavg()
    return info


def measure_peaks(repeats: int = 5, sizes: tuple[int, ...] = (2048, 4096)) -> dict:
    """Matmul GFLOP/s, median of ``repeats``: fp32 via torch.mm (BLAS) and via oneDNN, bf16 via torch.mm."""
    import torch

    res: dict[str, float] = {}
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n)
            b = torch.randn(n, n)
            ab, bb = a.bfloat16(), b.bfloat16()
            contenders = {"fp32_blas": lambda: torch.mm(a, b), "bf16": lambda: torch.mm(ab, bb)}
            if torch.backends.mkldnn.is_available():
                contenders["fp32_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
            times = interleaved(contenders, repeats, warmup=1)
            for k, t in times.items():
                res[f"{k}_{n}"] = 2 * n**3 / t.median / 1e9
    peak = {k: max(v for kk, v in res.items() if kk.startswith(k + "_")) for k in ("fp32_blas", "fp32_onednn", "bf16")
            if any(kk.startswith(k + "_") for kk in res)}
    peak["fp32"] = max(peak.get("fp32_blas", 0.0), peak.get("fp32_onednn", 0.0))
    return {"gflops": peak, "by_size": res, "sizes": list(sizes)}


# ------------------------------------------------------------------------------------------ models


def _perturb_bn(model) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


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
    _perturb_bn(ours)
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


# ------------------------------------------------------------------------------------------ memory


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def memory_probe(spec: dict) -> dict:
    """In this (fresh) process: resident memory before, and peak during, one inference forward pass."""
    import gc

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = build(spec["impl"], spec["model"]).eval()
    x = torch.randn(spec["batch"], 3, spec["res"], spec["res"])
    gc.collect()
    before = _rss_kb("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    with torch.inference_mode():
        model(x)
    peak = _rss_kb("VmHWM")
    return {"before_mb": before / 1024, "peak_mb": peak / 1024, "delta_mb": (peak - before) / 1024, "hwm_reset": reset}


def run_memory_probe(impl: str, model_name: str, res: int, batch: int, threads: int | None) -> dict:
    spec = json.dumps({"impl": impl, "model": model_name, "res": res, "batch": batch, "threads": threads})
    cmd = [sys.executable, "-m", "xcit", "bench", "--memory-probe", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        oom = proc.returncode in (-9, 137) or "memory" in tail[0].lower()
        return {"error": ("out of memory: " if oom else "") + tail[0], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ cases


def _fwd(model, x, autocast=None):
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


def _train_step(model, x, y):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return run


class Bench:
    def __init__(self, args: argparse.Namespace, preset: dict) -> None:
        self.args = args
        self.preset = preset
        self.model = args.model
        self.repeats = args.repeats or preset["repeats"]
        self.results: dict = {"cases": {}, "memory": {}, "flops": {}}
        self._models: dict = {}

    def log(self, msg: str) -> None:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)

    def model_for(self, impl: str):
        if impl not in self._models:
            self._models[impl] = build(impl, self.model).eval()
        return self._models[impl]

    def flops(self, impl: str, res: int, batch: int, executed: bool = False) -> float:
        key = f"{'vit' if impl == 'vit' else 'xcit'}{'-exec' if executed else ''}@{res}x{batch}"
        if key not in self.results["flops"]:
            self.results["flops"][key] = model_flops(impl, self.model, res, batch, executed)
        return self.results["flops"][key]

    def case(self, name: str, contenders: dict, res: int, batch: int, repeats: int | None = None, warmup: int = 1,
             base: str = "timm", flop_impl: dict | None = None, extra: dict | None = None) -> dict:
        import torch

        repeats = repeats or self.repeats
        load0 = os.getloadavg()[0]
        self.log(f"{name}: {', '.join(contenders)} at {res}x{res} batch {batch}, {repeats} rounds")
        times = interleaved(contenders, repeats, warmup)
        load1 = os.getloadavg()[0]
        entry = {"res": res, "batch": batch, "tokens": _tokens(res, self.patch), "repeats": repeats,
                 "load": [load0, load1], "threads": torch.get_num_threads(), "base": base, "rows": {}}
        for k, t in times.items():
            impl = (flop_impl or {}).get(k, "vit" if k.startswith("vit") else "xcit")
            fl = self.flops(impl, res, batch)
            row = {"median_s": t.median, "min_s": min(t.times), "times": t.times, "flops": fl,
                   "per_image_s": t.median / batch, "gflops_per_s": fl / t.median / 1e9}
            if base in times and k != base:
                row["speedup_vs_base"] = paired_ratio(times[base], t)
            entry["rows"][k] = row
        entry.update(extra or {})
        self.results["cases"][name] = entry
        summary = ", ".join(f"{k} {r['median_s'] * 1e3:.0f} ms" + (f" (x{r['speedup_vs_base']:.2f})" if "speedup_vs_base" in r else "")
                            for k, r in entry["rows"].items())
        self.log(f"  {summary}")
        return entry

    @property
    def patch(self) -> int:
        from ..models import MODELS, resolve_name

        return MODELS[resolve_name(self.model).arch].patch_size

    # -- the cases ---------------------------------------------------------------------------

    def run(self) -> dict:
        import torch

        a = self.args
        self.results["machine"] = machine_info()
        self.log(f"machine: {self.results['machine']['cpu']}, {torch.get_num_threads()} threads")
        self.log("matmul peaks")
        self.results["peak"] = measure_peaks(repeats=max(3, self.repeats // 2 + 1))
        self.log(f"  {json.dumps({k: round(v, 1) for k, v in self.results['peak']['gflops'].items()})}")
        b = a.batch
        torch.manual_seed(0)
        x224 = torch.randn(b, 3, 224, 224)
        this, fused, ref, vit = (self.model_for(k) for k in ("this", "this-fused", "timm", "vit"))
        scratch = tempfile.TemporaryDirectory()
        deploy, notes = deployment_runners(this, Path(scratch.name), torch.get_num_threads())
        self.results.setdefault("notes", []).extend(notes)
        # 1. eager inference at the two target configurations (and the deployment runtimes on our ONNX export)
        self.case(f"infer_224_b{b}", {"timm": _fwd(ref, x224), "this": _fwd(this, x224), "this-fused": _fwd(fused, x224),
                                      "vit": _fwd(vit, x224), **{k: make(x224) for k, make in deploy.items()}}, 224, b)
        x1k = torch.randn(1, 3, 1024, 1024)
        self.case("infer_1024_b1", {"timm": _fwd(ref, x1k), "this": _fwd(this, x1k), "this-fused": _fwd(fused, x1k),
                                    "vit": _fwd(vit, x1k), **{k: make(x1k) for k, make in deploy.items()}}, 1024, 1)
        scratch.cleanup()
        self.flops("this", 1024, 1, executed=True)  # the optimised model's own FLOPs, for the stricter peak fraction
        if self.preset.get("profile"):
            self.results["profile"] = {f"224_b{b}": profile_breakdown(fused, x224),
                                       "1024_b1": profile_breakdown(fused, x1k)}
        # 2. bf16 autocast vs timm fp32
        if self.preset.get("bf16"):
            self.case(f"bf16_224_b{b}", {"timm": _fwd(ref, x224), "this-fused-bf16": _fwd(fused, x224, torch.bfloat16),
                                         "this-bf16": _fwd(this, x224, torch.bfloat16),
                                         "timm-bf16": _fwd(ref, x224, torch.bfloat16)}, 224, b)
        # 3. training step (forward + backward + AdamW)
        if self.preset.get("train") and not a.no_train:
            tt, tr = build("this", self.model, train=True), build("timm", self.model, train=True)
            y = torch.randint(0, 1000, (b,))
            self.case(f"train_224_b{b}", {"timm": _train_step(tr, x224, y), "this": _train_step(tt, x224, y)}, 224, b,
                      repeats=max(3, self.repeats - 2))
            flops_train = 3 * self.flops("xcit", 224, b)
            for r in self.results["cases"][f"train_224_b{b}"]["rows"].values():
                r["flops"] = flops_train
                r["gflops_per_s"] = flops_train / r["median_s"] / 1e9
            del tt, tr
        # 4. torch.compile (inductor) of both
        if self.preset.get("compile") and not a.no_compile:
            self.compiled_cases(fused, ref, x224, x1k)
        # 5. scaling, batch 1
        self.scaling(this, fused, ref, vit)
        # 6. memory
        if self.preset.get("memory") and not a.no_memory:
            self.memory()
        if a.bf16_checkpoint:
            self.log(f"bf16 agreement on Fashion-MNIST with {a.bf16_checkpoint}")
            self.results["bf16_agreement"] = bf16_agreement(a.bf16_checkpoint)
        self.results["machine"]["load_end"] = os.getloadavg()
        return self.results

    def compiled_cases(self, fused, ref, x224, x1k) -> None:
        import torch

        for name, x, res, batch in ((f"compiled_224_b{x224.shape[0]}", x224, 224, x224.shape[0]),
                                    ("compiled_1024_b1", x1k, 1024, 1)):
            torch._dynamo.reset()
            comp = {}
            compile_s = {}
            for label, model, fullgraph in (("timm-compiled", ref, False), ("this-fused-compiled", fused, True)):
                c = torch.compile(model, fullgraph=fullgraph, dynamic=False)
                t0 = time.perf_counter()
                _fwd(c, x)()
                compile_s[label] = time.perf_counter() - t0
                self.log(f"  compiled {label} at {res} in {compile_s[label]:.0f} s")
                comp[label] = _fwd(c, x)
            self.case(name, comp, res, batch, base="timm-compiled", extra={"compile_s": compile_s})

    def scaling(self, this, fused, ref, vit) -> None:
        import torch

        sizes = self.args.sizes or self.preset["sizes"]
        vit_max, timm_max = self.preset["vit_max"], self.preset["timm_max"]
        for res in sizes:
            x = torch.randn(1, 3, res, res)
            contenders = {"this-fused": _fwd(fused, x)}
            if res <= timm_max:
                contenders["timm"] = _fwd(ref, x)
            if res <= vit_max:
                contenders["vit"] = _fwd(vit, x)
            large = _tokens(res, self.patch) > LARGE_TOKENS
            self.case(f"scale_{res}", contenders, res, 1, repeats=self.preset["large_repeats"] if large else self.repeats,
                      base="timm" if "timm" in contenders else "this-fused")

    def memory(self) -> None:
        sizes = self.args.sizes or self.preset["sizes"]
        threads = self.args.threads
        for res in sizes:
            for impl in ("this-fused", "timm", "vit"):
                if impl == "vit" and res > self.preset["vit_max"] or impl == "timm" and res > self.preset["timm_max"]:
                    continue
                key = f"{impl}@{res}"
                self.log(f"memory {key}")
                self.results["memory"][key] = {"impl": impl, "res": res, "tokens": _tokens(res, self.patch),
                                               **run_memory_probe(impl, self.model, res, 1, threads)}
                m = self.results["memory"][key]
                self.log(f"  {m.get('delta_mb', float('nan')):.0f} MB" if "delta_mb" in m else f"  {m['error']}")


def _tokens(res: int, patch: int) -> int:
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


# ------------------------------------------------------------------------------------------ bf16 agreement


def bf16_agreement(checkpoint: str, data: str = "fashion-mnist", split: str = "val", batch_size: int = 256) -> dict:
    """Top-1 predictions of a trained checkpoint in fp32 and under bf16 autocast (the optimised model)."""
    import torch

    from ..data.datasets import TensorImageDataset, build_dataset
    from ..data.loader import ShardSampler, build_loader
    from ..data.transforms import BatchEvalTransform
    from ..models import create_model, optimize
    from ..models.weights import read_metadata as read_model_metadata

    meta = read_model_metadata(checkpoint)
    saved = meta.get("data", {}) if isinstance(meta.get("data"), dict) else {}
    chans = saved.get("in_chans") or 1
    dataset = build_dataset(data, split, in_chans=chans)
    if not isinstance(dataset, TensorImageDataset):
        raise ValueError("the agreement check expects a tensor dataset such as fashion-mnist")
    size = saved.get("img_size") or dataset.native_size
    tf = BatchEvalTransform(size, crop_pct=saved.get("crop_pct", 1.0), mean=tuple(saved.get("mean") or dataset.mean),
                            std=tuple(saved.get("std") or dataset.std), interpolation=saved.get("interpolation", "bicubic"))
    loader = build_loader(dataset, ShardSampler(len(dataset), num_replicas=1, rank=0), batch_size, batch_transform=tf,
                          workers=0)
    model = optimize(create_model(checkpoint=checkpoint, in_chans=chans))
    same = n = correct32 = correct16 = 0
    t32 = t16 = 0.0
    with torch.inference_mode():
        for images, targets, _ in loader:
            t0 = time.perf_counter()
            p32 = model(images).argmax(1)
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                p16 = model(images).float().argmax(1)
            t2 = time.perf_counter()
            t32 += t1 - t0
            t16 += t2 - t1
            same += int((p32 == p16).sum())
            correct32 += int((p32 == targets).sum())
            correct16 += int((p16 == targets).sum())
            n += len(targets)
    return {"checkpoint": str(checkpoint), "n": n, "agreement": same / n, "top1_fp32": correct32 / n,
            "top1_bf16": correct16 / n, "img_size": size, "time_fp32_s": t32, "time_bf16_s": t16}


# ------------------------------------------------------------------------------------------ report


def run_bench(args: argparse.Namespace) -> int:
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    out = args.out
    plot = args.plot or out.with_name("scaling.png")
    if args.render:
        from . import bench_report

        results = json.loads(args.render.read_text())
        others = [json.loads(p.read_text()) for p in args.appendix]
        bench_report.plot_scaling(results, plot)
        out.write_text(bench_report.render(results, plot_path=os.path.relpath(plot, out.parent), appendix=others))
        print(f"wrote {out}, {plot}")
        return 0
    import torch

    try:
        import timm  # noqa: F401
    except ImportError as err:
        raise ValueError("xcit bench compares against timm: pip install timm") from err
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise ValueError("--clock cpu measures process CPU time and needs --threads 1 (with more threads it "
                             "would count OpenMP spin-waiting)")
        CLOCK = time.process_time
    preset = dict(PRESETS[args.preset])
    raw = args.json or out.with_name("results.json")
    command = "xcit bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else "xcit bench"
    bench = Bench(args, preset)
    t0 = time.time()
    results = bench.run()
    results["command"] = os.environ.get("XCIT_BENCH_COMMAND", command)
    results["clock"] = args.clock
    results["model"] = args.model
    results["preset"] = args.preset
    results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["duration_s"] = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    from . import bench_report

    bench_report.plot_scaling(results, plot)
    out.write_text(bench_report.render(results, plot_path=os.path.relpath(plot, out.parent)))
    print(f"wrote {out}, {plot}, {raw}")
    return 0
