"""`xcit bench --preset roofline`: this project's best path per precision against every peer, one table.

Rendering runs on synthetic numbers; the contenders on a small model at a small size (no timing is asserted).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xcit.bench import report


def _contender(median: float, flops: float, peak: float, this_median: float | None = None, setup: float = 1.0) -> dict:
    c = {"median_s": median, "min_s": median * 0.98, "times": [median] * 3, "setup_s": setup,
         "gflops_per_s": flops / median / 1e9, "share_of_peak": flops / median / 1e9 / peak}
    if this_median is not None:
        c["this_speedup"] = median / this_median
    return c


def _row(workload, res, batch, precision, medians: dict, peak: float, skipped=None) -> dict:
    flops = 2 * 4.6e9 * batch * (res / 224) ** 2 * (3 if workload == "train" else 1)
    this = medians.get("this")
    contenders = {k: _contender(v, flops, peak, None if k == "this" else this) for k, v in medians.items()}
    row = {"workload": workload, "res": res, "batch": batch, "precision": precision, "flops": flops, "peak_gflops": peak,
           "repeats": 3, "threads": 1, "load": [0.5, 0.6], "contenders": contenders, "skipped": skipped or {}}
    peers = [k for k in medians if k != "this"]
    row["best_peer"] = min(peers, key=medians.get)
    if this:
        row["this_vs_best_peer"] = medians[row["best_peer"]] / this
    row["export_ratio"] = {r: medians[f"{r}@timm"] / medians[f"{r}@ours"] for r in ("openvino", "onnxruntime")
                           if f"{r}@ours" in medians and f"{r}@timm" in medians}
    if this and precision != "int8":  # the int8 row stands for a results file written before the ceiling existed
        products = 0.8 * this
        row["this_products"] = {"products_s": products, "profiled_s": this, "ops": {"aten::mm": products},
                                "ceiling_share": flops / products / 1e9 / peak}
    return row


def _in_fresh_process(test):
    """Run ``test`` in a fresh interpreter. Run in the test session itself, OpenVINO + NNCF and the Inductor int8
    compile left state behind that crashed (SIGSEGV, no Python traceback) an unrelated export test later on."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get("XCIT_FRESH_PROCESS_TEST") == test.__name__:
            return test(*args, **kwargs)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              f"{__file__}::{test.__name__}"], env={**os.environ, "XCIT_FRESH_PROCESS_TEST": test.__name__},
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return wrapper


@pytest.fixture()
def roofline_results() -> dict:
    peak = {"fp32_blas": 97.0, "fp32_onednn": 108.0, "fp32": 108.0, "bf16": 207.0, "int8": 445.0}
    rows = {
        "infer_224_b16_fp32": _row("infer", 224, 16, "fp32", {"this": 1.65, "timm": 2.0, "timm-inductor": 1.8,
                                                              "openvino@ours": 1.69, "openvino@timm": 1.72,
                                                              "onnxruntime@ours": 1.7, "onnxruntime@timm": 1.8}, 108.0),
        "infer_224_b16_bf16": _row("infer", 224, 16, "bf16", {"this": 0.92, "timm": 1.1, "timm-inductor": 0.88,
                                                              "openvino@ours": 0.9, "openvino@timm": 0.89}, 207.0,
                                   {"onnxruntime@ours": "ONNX Runtime has no bf16 path on the CPU"}),
        "infer_224_b16_int8": _row("infer", 224, 16, "int8", {"this": 0.62, "openvino@ours": 0.63,
                                                              "openvino@timm": 0.6}, 445.0,
                                   {"timm": "timm has no int8 path of its own"}),
        "train_224_b16_bf16": _row("train", 224, 16, "bf16", {"this": 3.08, "timm": 3.36, "timm-inductor": 3.4}, 207.0),
    }
    machine = {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 17", "cpu_flags": ["avx512f", "avx512_bf16"],
               "cores": 2, "threads": 1, "isa": ["avx2", "avx512f"], "caches": {"L2 cache": "2 MiB"}, "python": "3.11",
               "platform": "Linux", "load_start": [0.5, 0.5, 0.5], "load_end": [0.7, 0.6, 0.5], "torch": "2.14",
               "blas": "MKL", "onednn": True, "gpu": None, "xcit": "0.1.0 (git 0123abc +changes)"}
    return {"cases": {}, "memory": {}, "flops": {}, "machine": machine, "peak": {"gflops": peak, "sizes": [2048]},
            "roofline": {"rows": rows, "calibration": {"224": "32 Fashion-MNIST training images"}, "exports": {},
                         "versions": {"torch": "2.14", "openvino": "2026.4"}, "notes": []},
            "command": "taskset -c 1 xcit bench --preset roofline --threads 1 --clock cpu", "clock": "cpu",
            "model": "xcit_small_12_p16", "preset": "roofline", "date": "2026-12-05 21:00 UTC", "duration_s": 1500.0}


def test_roofline_report_has_the_table_the_machine_and_the_command(roofline_results):
    text = report.render(roofline_results)
    for needle in ("| workload, precision | project best path | best peer | project / best peer | project share of peak |",
                   "AMD EPYC", "AuthenticAMD family 25 model 17", "avx512_bf16", roofline_results["command"],
                   "process CPU time", "| 224 px batch 16, fp32 | `xcit.optimize` 1.65 s | OpenVINO, our export 1.69 s | 1.02x |",
                   "training step 224 b16 (fwd + bwd + AdamW), bf16 autocast", "timm + Inductor (freezing), bf16 autocast 0.88 s",
                   "OpenVINO + NNCF int8, timm's export", "ONNX Runtime has no bf16 path", "int8 445 GOP/s",
                   "xcit 0.1.0 (git 0123abc +changes)"):
        assert needle in text, needle
    assert "scaling.png" not in text and "## Targets" not in text  # the suite's other sections are not there
    table = report.roofline_table(roofline_results)
    assert table[2].endswith(f"| {2 * 4.6e9 * 16 / 1.65 / 1e9 / 108:.0%} | {2 * 4.6e9 * 16 / 1.69 / 1e9 / 108:.0%} | "
                             f"1.32 s ({2 * 4.6e9 * 16 / 1.32 / 1e9 / 108:.0%}) |")
    assert next(line for line in table if "int8" in line).endswith("| - |")  # no ceiling recorded: none shown
    # fp32 shares of torch.mm's own peak (lower than oneDNN's here) ride beside the stricter share, in brackets
    fp32 = roofline_results["roofline"]["rows"]["infer_224_b16_fp32"]["contenders"]
    for c in fp32.values():
        c["share_of_mm_peak"] = c["gflops_per_s"] / 97.0
    line = report.roofline_table(roofline_results)[2]
    assert f"| {2 * 4.6e9 * 16 / 1.65 / 1e9 / 108:.0%} ({2 * 4.6e9 * 16 / 1.65 / 1e9 / 97:.0%} of torch.mm) |" in line
    assert "of torch.mm" not in report.roofline_table(roofline_results)[3]  # bf16: one peak, one share
    roofline_results["roofline"]["rows"]["train_224_b16_bf16"]["this_products"] = {"error": "RuntimeError: profiler"}
    assert report.roofline_table(roofline_results)[-1].endswith("| - |")  # a failed profile: none shown either


def test_export_table_says_where_our_export_is_slower(roofline_results):
    lines = report.export_table(roofline_results)
    fp32 = next(line for line in lines if line.startswith("| OpenVINO, 224 px batch 16, fp32"))
    int8 = next(line for line in lines if line.startswith("| OpenVINO + NNCF int8, 224 px batch 16, int8"))
    assert fp32.endswith("| 1.02x (1.02-1.02) | yes |") and int8.endswith("| 0.95x (0.95-0.95) | **no** |")


def test_roofline_summary_is_what_the_command_prints(roofline_results):
    text = "\n".join(report.roofline_summary(roofline_results))
    assert "AMD EPYC (AuthenticAMD family 25 model 17; flags: avx512f, avx512_bf16); 1 thread;" in text
    assert "| 1024" not in text and text.count("| 224 px batch 16,") >= 3


def test_render_files_redraws_a_roofline_report_without_a_plot(roofline_results, tmp_path):
    from xcit.bench import render_files

    raw = tmp_path / "results.json"
    raw.write_text(json.dumps(roofline_results))
    out = tmp_path / "RESULTS.md"
    assert render_files(raw, out, appendix=[raw]) is None
    assert not (tmp_path / "scaling.png").exists()
    text = out.read_text()
    assert "## Cross-check run: roofline" in text and text.count("| workload, precision | project best path |") == 2


def test_int8_peak_is_measured_beside_fp32_and_bf16():
    from xcit.bench.timing import measure_peaks

    peak = measure_peaks(repeats=1, sizes=(64,))
    assert "int8_error" not in peak, peak["int8_error"]
    assert all(peak["gflops"][k] > 0 for k in ("fp32", "bf16", "int8"))


def test_roofline_preset_from_the_command_line_and_a_config_file(tmp_path):
    from xcit.bench import PRESETS, Bench, BenchSettings
    from xcit.bench.suite import writes_plot
    from xcit.cli import build_parser
    from xcit.cli.config import parse_args

    args = parse_args(build_parser(), ["bench", "--preset", "roofline", "--threads", "1", "--clock", "cpu"])
    assert (args.preset, args.batch, args.threads) == ("roofline", None, 1)
    config = tmp_path / "roofline.yaml"
    config.write_text("preset: roofline\nbatch: 8\nsizes: [512]\n")
    args = parse_args(build_parser(), ["bench", "--config", str(config)])
    assert (args.preset, args.batch, args.sizes) == ("roofline", 8, [512])
    settings = BenchSettings(preset="roofline")
    settings.check()
    assert Bench(settings).batch == 16 and Bench(BenchSettings(preset="quick")).batch == 32
    assert not writes_plot("roofline") and writes_plot("full") and PRESETS["roofline"]["sizes"] == [1024]


def test_calibration_set_is_three_channel_images_at_the_size():
    from xcit.bench.contenders import calibration_set

    images, what = calibration_set(3, 48)
    assert images.shape == (3, 3, 48, 48) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert "48x48" in what


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_best_path_inference_and_training(precision):
    from xcit.bench.contenders import best_path, build

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = build("this", "xcit_nano_12_p16").eval()
    run = best_path(model, precision)(x)
    out = run()
    assert out.shape == (2, 1000) and torch.isfinite(out.float()).all()
    with torch.no_grad():
        torch.testing.assert_close(out.float(), model(x), atol=0.5 if precision == "bf16" else 1e-4, rtol=0)
    step = best_path(build("this", "xcit_nano_12_p16", train=True), precision, train=True)(x, torch.tensor([1, 2]))
    loss = step()
    assert loss.ndim == 0 and torch.isfinite(loss)
    # the ceiling's profile finds the products of both paths under the names PRODUCT_OPS lists
    from xcit.bench.contenders import products_profile
    from xcit.models.kernels import HAS_ONEDNN

    infer, train = products_profile(run, repeats=1), products_profile(step, repeats=1)
    assert not HAS_ONEDNN or "mkldnn::_linear_pointwise" in infer["ops"]
    assert {"aten::mm", "aten::convolution_backward"} <= set(train["ops"])
    assert all(0 < p["products_s"] < p["profiled_s"] for p in (infer, train))


def test_products_profile_times_the_products_and_nothing_else():
    """A run of one product and much elementwise work: only the product's time counts, and it is below the total."""
    from xcit.bench.contenders import PRODUCT_OPS, products_profile

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(2_000_000)

    def run():
        for _ in range(5):
            x.mul_(1.0001).add_(1e-4)
        return torch.mm(a, b)

    prod = products_profile(run, repeats=2)
    assert set(prod["ops"]) == {"aten::mm"} and "aten::mm" in PRODUCT_OPS
    assert 0 < prod["products_s"] < prod["profiled_s"]
    assert sum(prod["ops"].values()) == pytest.approx(prod["products_s"])


@_in_fresh_process
def test_best_path_int8_runs_at_the_calibration_size():
    """One compile: calibration images and input share the batch (2) and size (48 px)."""
    from xcit.bench.contenders import best_path, build, calibration_set

    images, _ = calibration_set(2, 48)
    model = build("this", "xcit_nano_12_p16").eval()
    run = best_path(model, "int8", images)(images)
    out = run()
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    from xcit.bench.contenders import products_profile

    assert "onednn::qlinear_pointwise" in products_profile(run, repeats=1)["ops"]  # the int8 kernels are counted
    with pytest.raises(ValueError, match="calibration"):
        best_path(model, "int8")
    with pytest.raises(ValueError, match="precision"):
        best_path(model, "int8", images, train=True)


@_in_fresh_process
def test_runtimes_run_ours_and_timms_export_at_each_precision(tmp_path):
    """OpenVINO (f32, bf16, NNCF int8) and ONNX Runtime (fp32, static int8) on both exports: the fp32 runs agree
    with PyTorch; ONNX Runtime has no bf16 and says so."""
    import numpy as np

    from xcit import export as ex
    from xcit.bench.contenders import build, calibration_set, export_timm_onnx, runtime_runners

    ours, theirs = build("this", "xcit_nano_12_p16").eval(), build("timm", "xcit_nano_12_p16").eval()
    paths = {"ours": ex.export_onnx(ours, tmp_path / "ours.onnx", example_size=(48, 48), exporter="torchscript"),
             "timm": export_timm_onnx(theirs, tmp_path / "timm.onnx", example_size=(48, 48))}
    images, _ = calibration_set(4, 48)
    x = images[:2]
    with torch.no_grad():
        ref = ours(x).numpy()
    for name, path in paths.items():
        for precision in ("fp32", "bf16", "int8"):
            runners, skipped = runtime_runners(path, precision, tuple(x.shape), 1, tmp_path, images)
            expected = {"openvino", "onnxruntime"} - ({"onnxruntime"} if precision == "bf16" else set())
            assert set(runners) == expected, (name, precision, skipped)
            for runtime, make in runners.items():
                out = make(x)()
                out = np.asarray(out[0] if isinstance(out, (list, tuple)) else next(iter(out.values())))
                assert out.shape == (2, 1000) and np.isfinite(out).all()
                if precision == "fp32":
                    np.testing.assert_allclose(out, ref, atol=1e-4, err_msg=f"{runtime} on {name}")
    _, skipped = runtime_runners(paths["ours"], "bf16", tuple(x.shape), 1, tmp_path, runtimes=("onnxruntime",))
    assert "no bf16" in skipped["onnxruntime"]


def test_results_name_the_code_they_measured():
    """The version, and the commit with a mark for uncommitted changes when it runs from a git checkout."""
    import re
    import shutil

    import xcit
    from xcit.bench.timing import code_version, machine_info

    version = code_version()
    assert machine_info()["xcit"] == version and version.startswith(xcit.__version__)
    checkout = Path(xcit.__file__).resolve().parents[1].name == "src" and (Path(xcit.__file__).resolve().parents[2] / ".git").exists()
    if checkout and shutil.which("git"):
        assert re.fullmatch(re.escape(xcit.__version__) + r" \(git [0-9a-f]{7,}( \+changes)?\)", version), version
