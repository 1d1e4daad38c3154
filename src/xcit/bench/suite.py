"""The ``xcit bench`` suite: every timed comparison, interleaved, in one process, and its report files.

One process runs every timed comparison interleaved (A, B, C, A, B, C, ...) and reports medians
and paired ratios (the median over rounds of t_other / t_this); the machine's fp32 and bf16 matmul
peaks are measured in the same run. Peak memory is measured per configuration in a fresh
subprocess (:mod:`xcit.bench.memory`). Results: a markdown report (targets, tables, machine,
command), a log-log PNG and a JSON file (:func:`run_suite`; :func:`render_files` redraws them).

Contenders (:mod:`xcit.bench.contenders`):
* ``this`` - this project, eager, the plain model (``this-fused``: its inference transform ``xcit.optimize``);
* ``timm`` - ``timm``'s XCiT with the same weights (its default, non-fused XCA path);
* ``vit``  - a DeiT-style ViT of the same width, depth and patch size (heads = C / 64) with
  torch's scaled-dot-product attention, timm's ``VisionTransformer`` (``dynamic_img_size``).

The ``roofline`` preset (:meth:`Bench.roofline`) measures instead, per workload (inference at 224 batch
``batch`` and at each of ``sizes`` batch 1, a training step at 224 batch ``batch``) and precision (fp32,
bf16, int8; training fp32 and bf16 autocast), this project's best path against every peer (timm eager,
timm + Inductor, OpenVINO and ONNX Runtime on this project's ONNX export and on timm's; NNCF and static
ONNX Runtime quantisation for int8), each as a share of the matmul peak of its precision measured in
the same run; one table (:func:`xcit.bench.report.roofline_table`), printed and in the report. After each
row's timed rounds the project's path is profiled twice more (:func:`xcit.bench.contenders.products_profile`): the
time its products take bounds the share of peak it can reach with the same product kernels (the "ceiling").
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..data.outputs import atomic_write, claim_file
from . import report
from .agreement import bf16_agreement
from .contenders import (
    PRECISIONS, RUNTIMES, best_path, build, calibration_set, deployment_runners, export_timm_onnx, forward_runner,
    inductor_runner, model_flops, products_profile, profile_breakdown, runtime_runners, tokens, train_step_runner,
)
from .timing import CLOCKS, interleaved, machine_info, measure_peaks, paired_ratio

PRESETS = {
    # resolutions timed at batch 1 for the scaling curve; XCiT alone beyond ``vit_max``
    "full": dict(sizes=[224, 384, 512, 768, 1024, 1536, 2048, 3072, 4096], vit_max=2048, timm_max=4096, repeats=7,
                 large_repeats=3, compile=True, train=True, bf16=True, memory=True, profile=True, batch=32),
    "quick": dict(sizes=[224, 512, 1024], vit_max=1024, timm_max=1024, repeats=3, large_repeats=2, compile=False,
                  train=True, bf16=True, memory=True, profile=False, batch=32),
    # one table: this project's best path vs every peer, per workload and precision, as shares of the matmul peaks
    # (sizes: the batch-1 inference resolutions; compile: timm + Inductor; no plot, no memory subprocesses)
    "roofline": dict(kind="roofline", sizes=[1024], repeats=5, compile=True, train=True, batch=16, plot=False),
}
LARGE_TOKENS = 8192  # configurations with more tokens than this use ``large_repeats``
ROOFLINE_PEAK_REPEATS = 9  # calls per matmul peak in the roofline preset (the median of them is the peak)


@dataclass
class BenchSettings:
    """What one suite run measures (the options of ``xcit bench``)."""

    model: str = "xcit_small_12_p16"  # XCiT architecture
    preset: str = "full"  # a key of PRESETS
    sizes: list[int] | None = None  # scaling resolutions (batch 1); default: the preset's
    batch: int | None = None  # batch of the 224 comparisons; default: the preset's (32; roofline 16)
    repeats: int | None = None  # timed rounds per comparison; default: the preset's
    threads: int | None = None  # torch threads; default: torch's
    clock: str = "wall"  # wall: perf_counter; cpu: process CPU time (with threads=1 only)
    compile: bool = True  # the torch.compile comparisons (when the preset has them)
    train: bool = True  # the training-step comparison
    memory: bool = True  # the peak-memory subprocesses
    bf16_checkpoint: str | None = None  # trained model for the bf16 / fp32 top-1 agreement

    def check(self) -> None:
        """``ValueError`` for settings that cannot run, before anything is timed."""
        if self.preset not in PRESETS:
            raise ValueError(f"expected a preset in {sorted(PRESETS)}, got {self.preset!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"expected a clock in {sorted(CLOCKS)}, got {self.clock!r}")
        for name, low in (("batch", 1), ("repeats", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"expected {name} to be an integer >= {low}, got {value!r}")
        if self.sizes is not None and (not self.sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                             for s in self.sizes)):
            raise ValueError(f"expected sizes to be resolutions >= 1 pixel, got {self.sizes!r}")
        from ..models import resolve_name

        resolve_name(self.model)


class Bench:
    """One run of the suite: every case of :class:`BenchSettings`, results gathered in ``self.results``."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.preset = dict(PRESETS[settings.preset])
        self.model = settings.model
        self.repeats = settings.repeats or self.preset["repeats"]
        self.batch = settings.batch or self.preset["batch"]
        self.clock = CLOCKS[settings.clock]
        self.results: dict = {"cases": {}, "memory": {}, "flops": {}}
        self._models: dict = {}
        self._calibration: dict = {}

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
        times = interleaved(contenders, repeats, warmup, clock=self.clock)
        load1 = os.getloadavg()[0]
        entry = {"res": res, "batch": batch, "tokens": tokens(res, self.patch), "repeats": repeats,
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

        a = self.settings
        if self.preset.get("kind") == "roofline":
            return self.roofline()
        self.results["machine"] = machine_info()
        self.log(f"machine: {self.results['machine']['cpu']}, {torch.get_num_threads()} threads")
        self.log("matmul peaks")
        self.results["peak"] = measure_peaks(repeats=max(3, self.repeats // 2 + 1), clock=self.clock)
        self.log(f"  {json.dumps({k: round(v, 1) for k, v in self.results['peak']['gflops'].items()})}")
        b = self.batch
        torch.manual_seed(0)
        x224 = torch.randn(b, 3, 224, 224)
        this, fused, ref, vit = (self.model_for(k) for k in ("this", "this-fused", "timm", "vit"))
        scratch = tempfile.TemporaryDirectory()
        deploy, notes = deployment_runners(this, Path(scratch.name), torch.get_num_threads())
        self.results.setdefault("notes", []).extend(notes)
        # 1. eager inference at the two target configurations (and the deployment runtimes on our ONNX export)
        self.case(f"infer_224_b{b}", {"timm": forward_runner(ref, x224), "this": forward_runner(this, x224), "this-fused": forward_runner(fused, x224),
                                      "vit": forward_runner(vit, x224), **{k: make(x224) for k, make in deploy.items()}}, 224, b)
        x1k = torch.randn(1, 3, 1024, 1024)
        self.case("infer_1024_b1", {"timm": forward_runner(ref, x1k), "this": forward_runner(this, x1k), "this-fused": forward_runner(fused, x1k),
                                    "vit": forward_runner(vit, x1k), **{k: make(x1k) for k, make in deploy.items()}}, 1024, 1)
        scratch.cleanup()
        self.flops("this", 1024, 1, executed=True)  # the optimised model's own FLOPs, for the stricter peak fraction
        if self.preset.get("profile"):
            self.results["profile"] = {f"224_b{b}": profile_breakdown(fused, x224),
                                       "1024_b1": profile_breakdown(fused, x1k)}
        # 2. bf16 autocast vs timm fp32
        if self.preset.get("bf16"):
            self.case(f"bf16_224_b{b}", {"timm": forward_runner(ref, x224), "this-fused-bf16": forward_runner(fused, x224, torch.bfloat16),
                                         "this-bf16": forward_runner(this, x224, torch.bfloat16),
                                         "timm-bf16": forward_runner(ref, x224, torch.bfloat16)}, 224, b)
        # 3. training step (forward + backward + AdamW)
        if self.preset.get("train") and a.train:
            tt, tr = build("this", self.model, train=True), build("timm", self.model, train=True)
            y = torch.randint(0, 1000, (b,))
            self.case(f"train_224_b{b}", {"timm": train_step_runner(tr, x224, y), "this": train_step_runner(tt, x224, y)}, 224, b,
                      repeats=max(3, self.repeats - 2))
            flops_train = 3 * self.flops("xcit", 224, b)
            for r in self.results["cases"][f"train_224_b{b}"]["rows"].values():
                r["flops"] = flops_train
                r["gflops_per_s"] = flops_train / r["median_s"] / 1e9
            del tt, tr
        # 4. torch.compile (inductor) of both
        if self.preset.get("compile") and a.compile:
            self.compiled_cases(fused, ref, x224, x1k)
        # 5. scaling, batch 1
        self.scaling(this, fused, ref, vit)
        # 6. memory
        if self.preset.get("memory") and a.memory:
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
                forward_runner(c, x)()
                compile_s[label] = time.perf_counter() - t0
                self.log(f"  compiled {label} at {res} in {compile_s[label]:.0f} s")
                comp[label] = forward_runner(c, x)
            self.case(name, comp, res, batch, base="timm-compiled", extra={"compile_s": compile_s})

    def scaling(self, this, fused, ref, vit) -> None:
        import torch

        sizes = self.settings.sizes or self.preset["sizes"]
        vit_max, timm_max = self.preset["vit_max"], self.preset["timm_max"]
        for res in sizes:
            x = torch.randn(1, 3, res, res)
            contenders = {"this-fused": forward_runner(fused, x)}
            if res <= timm_max:
                contenders["timm"] = forward_runner(ref, x)
            if res <= vit_max:
                contenders["vit"] = forward_runner(vit, x)
            large = tokens(res, self.patch) > LARGE_TOKENS
            self.case(f"scale_{res}", contenders, res, 1, repeats=self.preset["large_repeats"] if large else self.repeats,
                      base="timm" if "timm" in contenders else "this-fused")

    # -- the roofline preset ---------------------------------------------------------------------

    def roofline(self) -> dict:
        """Every workload x precision: this project's best path and every peer, interleaved (module docstring)."""
        import torch

        a = self.settings
        threads = torch.get_num_threads()
        self.results["machine"] = machine_info()
        m = self.results["machine"]
        self.log(f"machine: {m['cpu']} ({m['cpu_id']}; {', '.join(m['cpu_flags']) or 'no avx512 / amx flags'}), "
                 f"{threads} threads")
        self.log("matmul peaks, n = 2048")
        # a median of three calls once let one slow moment set the int8 peak 15 % low; nine take about 4 s
        self.results["peak"] = measure_peaks(repeats=max(ROOFLINE_PEAK_REPEATS, self.repeats), sizes=(2048,),
                                             clock=self.clock)
        self.log(f"  {json.dumps({k: round(v, 1) for k, v in self.results['peak']['gflops'].items()})}")
        roof = self.results["roofline"] = {"rows": {}, "calibration": {}, "exports": {}, "versions": _versions(),
                                           "notes": []}
        this, ref = self.model_for("this"), self.model_for("timm")
        scratch = tempfile.TemporaryDirectory()
        workdir = Path(scratch.name)
        exports = {}
        for label, export in (("ours", lambda p: self._export_ours(this, p)), ("timm", lambda p: export_timm_onnx(ref, p))):
            t0 = time.perf_counter()
            try:
                exports[label] = export(workdir / f"{label}.onnx")
                roof["exports"][label] = {"seconds": time.perf_counter() - t0}
            except Exception as err:  # noqa: BLE001 - the runtimes on that export are skipped, the rest runs
                roof["exports"][label] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                roof["notes"].append(f"ONNX export of {label} failed: {roof['exports'][label]['error']}")
        b = self.batch
        work = [("infer", 224, b), *(("infer", s, 1) for s in (a.sizes or self.preset["sizes"]))]
        if self.preset.get("train") and a.train:
            work.append(("train", 224, b))
        try:
            for workload, res, batch in work:
                for precision in PRECISIONS if workload == "infer" else ("fp32", "bf16"):
                    self.roofline_row(workload, res, batch, precision, this, ref, exports, workdir, threads)
        finally:
            scratch.cleanup()
        self.results["machine"]["load_end"] = os.getloadavg()
        return self.results

    def calibration(self, res: int):
        """The int8 calibration images at ``res`` (the same for every contender): 32 at 224, fewer at larger sizes
        (about as many pixels; at least 2)."""
        key = str(res)
        if key not in self._calibration:
            n = max(2, min(32, round(32 * (224 / res) ** 2)))
            images, what = calibration_set(n, res)
            self._calibration[key] = images
            self.results["roofline"]["calibration"][key] = what
        return self._calibration[key]

    @staticmethod
    def _export_ours(model, path: Path) -> Path:
        from .. import export as ex

        return ex.export_onnx(model, path, example_size=(224, 224), exporter="torchscript")

    def roofline_row(self, workload: str, res: int, batch: int, precision: str, this, ref, exports: dict,
                     workdir: Path, threads: int) -> dict:
        import gc

        import torch

        a = self.settings
        name = f"{workload}_{res}_b{batch}_{precision}"
        torch._dynamo.reset()  # compiled graphs of the earlier rows are not needed again
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, res, res, generator=gen)
        autocast = torch.bfloat16 if precision == "bf16" else None
        makers, skipped = {}, {}
        compile_ = self.preset.get("compile") and a.compile
        if workload == "train":
            y = torch.randint(0, 1000, (batch,), generator=gen)
            fresh = lambda impl: build(impl, self.model, train=True)  # noqa: E731 - each step updates its own weights
            makers["this"] = lambda: best_path(fresh("this"), precision, train=True)(x, y)
            makers["timm"] = lambda: train_step_runner(fresh("timm"), x, y, autocast)
            if compile_:
                makers["timm-inductor"] = lambda: inductor_runner(fresh("timm"), x, autocast, y=y)
        else:
            calibration = self.calibration(res) if precision == "int8" else None
            makers["this"] = lambda: best_path(this, precision, calibration)(x)
            if precision == "int8":
                skipped["timm"] = skipped["timm-inductor"] = "timm has no int8 path of its own"
            else:
                makers["timm"] = lambda: forward_runner(ref, x, autocast)
                if compile_:
                    makers["timm-inductor"] = lambda: inductor_runner(ref, x, autocast)
            for export, path in exports.items():
                for runtime in RUNTIMES:
                    makers[f"{runtime}@{export}"] = (lambda p=path, r=runtime: self._runtime(
                        p, r, precision, x, threads, workdir, calibration))
        if not compile_:
            skipped.setdefault("timm-inductor", "torch.compile comparisons off (--no-compile)")
        contenders, setup_s = {}, {}
        for label, make in makers.items():
            self.log(f"{name}: setting up {label}")
            t0 = time.perf_counter()
            try:
                run = make()
                run()  # compiles, calibrates, plans: excluded from the timing, recorded as set-up time
            except _Skip as why:
                skipped[label] = str(why)
                continue
            except Exception as err:  # noqa: BLE001 - one contender's failure is recorded, the row goes on
                skipped[label] = f"failed: {type(err).__name__}: {str(err)[:300]}"
                self.log(f"  {skipped[label]}")
                continue
            setup_s[label] = time.perf_counter() - t0
            contenders[label] = run
        flops = self.flops("xcit", res, batch) * (3 if workload == "train" else 1)
        peak = self.results["peak"]["gflops"].get(precision)
        # fp32: the peak is the faster of torch.mm (BLAS) and oneDNN; where torch.mm is the slower one, the share of
        # its peak (a peak defined as torch.mm alone) is recorded beside it
        mm_peak = self.results["peak"]["gflops"].get("fp32_blas") if precision == "fp32" else None
        mm_peak = mm_peak if mm_peak and peak and mm_peak < peak else None
        load0 = os.getloadavg()[0]
        self.log(f"{name}: {', '.join(contenders)}, {self.repeats} rounds")
        times = interleaved(contenders, self.repeats, warmup=1, clock=self.clock)
        row = {"workload": workload, "res": res, "batch": batch, "precision": precision, "flops": flops,
               "peak_gflops": peak, "repeats": self.repeats, "threads": threads, "load": [load0, os.getloadavg()[0]],
               "contenders": {}, "skipped": skipped}
        for label, t in times.items():
            c = {"median_s": t.median, "min_s": min(t.times), "times": t.times, "setup_s": setup_s[label],
                 "gflops_per_s": flops / t.median / 1e9}
            if peak:
                c["share_of_peak"] = c["gflops_per_s"] / peak
            if mm_peak:
                c["share_of_mm_peak"] = c["gflops_per_s"] / mm_peak
            if "this" in times and label != "this":
                c["this_speedup"] = paired_ratio(t, times["this"])  # t_label / t_this: > 1 where this is faster
            row["contenders"][label] = c
        peers = [k for k in times if k != "this"]
        if peers:
            row["best_peer"] = min(peers, key=lambda k: times[k].median)
            if "this" in times:
                row["this_vs_best_peer"] = paired_ratio(times[row["best_peer"]], times["this"])
        row["export_ratio"] = {r: paired_ratio(times[f"{r}@timm"], times[f"{r}@ours"]) for r in RUNTIMES
                               if f"{r}@ours" in times and f"{r}@timm" in times}  # > 1: our export runs faster
        if "this" in contenders:  # after the timed rounds: the profiler's own cost stays out of them
            self.log(f"{name}: profiling the project's products")
            try:
                prod = row["this_products"] = products_profile(contenders["this"])
            except Exception as err:  # noqa: BLE001 - the row's timings stand without the ceiling
                row["this_products"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                self.results["roofline"]["notes"].append(
                    f"{name}: the project's products were not profiled (no ceiling): {row['this_products']['error']}")
            else:
                if peak and prod["products_s"] > 0:
                    prod["ceiling_share"] = flops / prod["products_s"] / 1e9 / peak
        self.results["roofline"]["rows"][name] = row
        self.log("  " + ", ".join(f"{k} {c['median_s']:.3f} s" + (f" ({c['share_of_peak']:.0%} of peak)" if "share_of_peak" in c else "")
                                  for k, c in row["contenders"].items()))
        del contenders, makers, times
        gc.collect()
        return row

    def _runtime(self, path: Path, runtime: str, precision: str, x, threads: int, workdir: Path, calibration):
        runners, skipped = runtime_runners(path, precision, tuple(x.shape), threads, workdir, calibration, runtimes=(runtime,))
        if runtime in skipped:
            raise _Skip(skipped[runtime])
        return runners[runtime](x)

    def memory(self) -> None:
        from .memory import run_memory_probe  # not at import: ``python -m xcit.bench.memory`` runs that module fresh

        sizes = self.settings.sizes or self.preset["sizes"]
        threads = self.settings.threads
        for res in sizes:
            for impl in ("this-fused", "timm", "vit"):
                if impl == "vit" and res > self.preset["vit_max"] or impl == "timm" and res > self.preset["timm_max"]:
                    continue
                key = f"{impl}@{res}"
                self.log(f"memory {key}")
                self.results["memory"][key] = {"impl": impl, "res": res, "tokens": tokens(res, self.patch),
                                               **run_memory_probe(impl, self.model, res, 1, threads)}
                m = self.results["memory"][key]
                self.log(f"  {m.get('delta_mb', float('nan')):.0f} MB" if "delta_mb" in m else f"  {m['error']}")


class _Skip(Exception):
    """A contender that does not apply here (a runtime not installed, a precision it has no CPU path for)."""


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "timm", "openvino", "nncf", "onnxruntime", "onnx", "torchao"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def writes_plot(preset: str) -> bool:
    """Whether a run of ``preset`` draws the scaling plot (the roofline preset has no scaling cases)."""
    return PRESETS[preset].get("plot", True)


def run_suite(settings: BenchSettings, out: Path, *, plot: Path | None = None, raw: Path | None = None,
              command: str = "xcit bench", overwrite: bool = False) -> dict:
    """Run the suite and write the markdown report ``out``, the plot (default ``scaling.png`` beside it; none
    for the roofline preset) and the raw results (default ``results.json`` beside it); returns the results.
    The files are checked before anything is timed: one that exists is refused unless ``overwrite``. The
    roofline preset also prints its table on stdout."""
    import torch

    settings.check()
    out = Path(out)
    plot = (plot or out.with_name("scaling.png")) if writes_plot(settings.preset) else None
    raw = raw or out.with_name("results.json")
    _claim_outputs(out, plot, raw, overwrite=overwrite)
    try:
        import timm  # noqa: F401
    except ImportError as err:
        raise ValueError("xcit bench compares against timm: pip install timm") from err
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.clock == "cpu" and torch.get_num_threads() != 1:
        raise ValueError("--clock cpu measures process CPU time and needs --threads 1 (with more threads it "
                         "would count OpenMP spin-waiting)")
    t0 = time.time()
    results = Bench(settings).run()
    results["command"] = os.environ.get("XCIT_BENCH_COMMAND", command)
    results["clock"] = settings.clock
    results["model"] = settings.model
    results["preset"] = settings.preset
    results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["duration_s"] = time.time() - t0
    with atomic_write(raw) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    _write_report(results, out, plot)
    if results.get("roofline"):
        print("\n".join(report.roofline_summary(results)), flush=True)
    return results


def render_files(results_json: Path, out: Path, *, plot: Path | None = None, appendix: list[Path] = (),
                 overwrite: bool = False) -> Path | None:
    """Re-write the report ``out`` and its plot from an earlier run's ``results.json``; ``appendix``: the
    results files of other runs whose summary and targets are appended (e.g. a ``--clock cpu`` cross-check).
    An existing ``out`` or plot is refused unless ``overwrite``; a results file is never written over.
    Returns the plot written (``None`` for a roofline run, which has none)."""
    out = Path(out)
    results = read_results(results_json)
    plot = (plot or out.with_name("scaling.png")) if report.has_scaling(results) or not results.get("roofline") else None
    _claim_outputs(out, plot, overwrite=overwrite, inputs=[results_json, *appendix])
    others = [read_results(p) for p in appendix]
    _write_report(results, out, plot, others)
    return plot


def read_results(path: str | os.PathLike) -> dict:
    """The results of an earlier suite run (its ``results.json``); a one-line ``ValueError`` naming the file for
    anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected the results.json of an earlier `xcit bench` run, got {path}, which "
                                f"{'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        results = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: expected the results.json of an earlier `xcit bench` "
                         "run") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}): expected the "
                         "results.json of an earlier `xcit bench` run") from None
    if not isinstance(results, dict) or not isinstance(results.get("cases"), dict):
        raise ValueError(f"{path} holds no benchmark cases: expected the results.json of an earlier `xcit bench` run")
    return results


def _claim_outputs(*paths: Path, overwrite: bool, inputs=()) -> None:
    options = ("--out", "--plot", "--json")
    for option, path in zip(options, paths):
        if path is not None:
            claim_file(path, overwrite=overwrite, option=option, inputs=inputs)


def _write_report(results: dict, out: Path, plot: Path | None, appendix: list[dict] = ()) -> None:
    try:
        text = report.render(results, plot_path=os.path.relpath(plot, out.parent) if plot else None,
                             appendix=list(appendix))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"the results lack what the report needs ({type(err).__name__}: {err}); expected the "
                         "results.json of an earlier `xcit bench` run") from None
    if plot is not None:
        with atomic_write(plot) as tmp:
            report.plot_scaling(results, tmp)
    with atomic_write(out) as tmp:
        tmp.write_text(text)
