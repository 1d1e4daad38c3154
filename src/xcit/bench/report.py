"""Markdown report and log-log plot of an ``xcit bench`` run (see :mod:`xcit.bench.suite`)."""
from __future__ import annotations

from pathlib import Path

LABELS = {
    "this": "this project, plain model",
    "this-fused": "this project, `xcit.optimize(model)`",
        "timm": "timm XCiT",
    "vit": "ViT (SDPA), same width/depth",
    "this-fused-bf16": "this project, `xcit.optimize`, bf16 autocast",
    "this-bf16": "this project, plain model, bf16 autocast",
    "timm-bf16": "timm XCiT, bf16 autocast",
    "timm-compiled": "timm XCiT, torch.compile",
    "this-fused-compiled": "this project, `xcit.optimize`, torch.compile(fullgraph)",
    "onnxruntime-fp32": "ONNX Runtime on this project's ONNX export, fp32",
    "openvino-fp32": "OpenVINO on this project's ONNX export (IR), fp32",
}


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def _row(results: dict, case: str, contender: str) -> dict | None:
    return results.get("cases", {}).get(case, {}).get("rows", {}).get(contender)


def _target(name, value, ok, fmt, goal, where):
    if value is None:
        return (name, "not measured", goal, "pending", where)
    return (name, fmt.format(value), goal, "met" if ok(value) else "**not met**", where)


def targets(results: dict) -> list[tuple]:
    peak = results["peak"]["gflops"]["fp32"]
    b = next((c["batch"] for k, c in results["cases"].items() if k.startswith("infer_224")), 32)
    rows = []

    def speed(case, who, goal, name):
        r = _row(results, case, who)
        v = r.get("speedup_vs_base") if r else None
        rows.append(_target(name, v, lambda x: x >= goal, "{:.2f}x", f">= {goal}x", case))

    speed(f"infer_224_b{b}", "this-fused", 1.25, f"inference vs timm, 224 batch {b}, eager (xcit.optimize)")
    speed(f"infer_224_b{b}", "this", 1.2, f"inference vs timm, 224 batch {b}, eager (plain model)")
    speed("infer_1024_b1", "this-fused", 1.25, "inference vs timm, 1024x1024 batch 1, eager (xcit.optimize)")
    speed("infer_1024_b1", "this", 1.2, "inference vs timm, 1024x1024 batch 1, eager (plain model)")
    speed(f"compiled_224_b{b}", "this-fused-compiled", 1.25, f"inference vs timm, 224 batch {b}, both torch.compile")
    speed("compiled_1024_b1", "this-fused-compiled", 1.25, "inference vs timm, 1024x1024 batch 1, both torch.compile")
    for case, who, label in (("infer_1024_b1", "this-fused", "eager"), ("compiled_1024_b1", "this-fused-compiled", "compiled")):
        r = _row(results, case, who)
        v = r["gflops_per_s"] / peak if r else None
        rows.append(_target(f"model FLOP/s / fp32 matmul peak at 1024x1024 ({label})", v, lambda x: x >= 0.8, "{:.0%}",
                            ">= 80%", case))
    exec_flops, r = results["flops"].get("xcit-exec@1024x1"), _row(results, "infer_1024_b1", "this-fused")
    if exec_flops and r:
        rows.append(_target("executed FLOP/s (after folding) / fp32 matmul peak at 1024x1024 (eager, stricter)",
                            exec_flops / r["median_s"] / 1e9 / peak, lambda x: x >= 0.8, "{:.0%}", ">= 80%",
                            "infer_1024_b1"))
    speed(f"bf16_224_b{b}", "this-fused-bf16", 3.0, f"bf16 autocast vs timm fp32, 224 batch {b}")
    ag = results.get("bf16_agreement")
    rows.append(_target("bf16 / fp32 top-1 agreement, Fashion-MNIST test set", ag["agreement"] if ag else None,
                        lambda x: x >= 0.995, "{:.2%}", ">= 99.5%", "bf16 agreement"))
    speed(f"train_224_b{b}", "this", 1.2, f"training step (fwd+bwd+AdamW) vs timm, 224 batch {b}")
    s512, s2048 = _row(results, "scale_512", "this-fused"), _row(results, "scale_2048", "this-fused")
    v = None
    if s512 and s2048:
        v = (s2048["median_s"] / results["cases"]["scale_2048"]["tokens"]) / (s512["median_s"] / results["cases"]["scale_512"]["tokens"])
    rows.append(_target("time per token, 2048 / 512 (this project)", v, lambda x: abs(x - 1) <= 0.15, "{:.2f}",
                        "within 15% (0.85-1.15)", "scaling"))
    v512, v2048 = _row(results, "scale_512", "vit"), _row(results, "scale_2048", "vit")
    v = None
    if v512 and v2048:
        v = (v2048["median_s"] / results["cases"]["scale_2048"]["tokens"]) / (v512["median_s"] / results["cases"]["scale_512"]["tokens"])
    rows.append(_target("time per token, 2048 / 512 (matched ViT)", v, lambda x: x >= 5, "{:.1f}x", ">= 5x", "scaling"))
    for res in (2048, 4096):
        m = results.get("memory", {}).get(f"this-fused@{res}")
        r = _row(results, f"scale_{res}", "this-fused")
        if m and "delta_mb" in m:
            val = f"runs: {_fmt_ms(r['median_s']) + ' ms, ' if r else ''}peak +{m['delta_mb']:,.0f} MB"
            rows.append((f"XCiT at {res}x{res}, batch 1, no out-of-memory", val, "runs", "met", f"scale_{res}"))
        elif m:
            rows.append((f"XCiT at {res}x{res}, batch 1, no out-of-memory", m.get("error", "failed"), "runs", "**not met**",
                         f"scale_{res}"))
        elif r:
            rows.append((f"XCiT at {res}x{res}, batch 1, no out-of-memory", f"runs: {_fmt_ms(r['median_s'])} ms", "runs",
                         "met", f"scale_{res}"))
    return rows


def key_numbers(results: dict) -> list[str]:
    """A short summary table (also used by docs/performance.md)."""
    peak = results["peak"]["gflops"]["fp32"]
    b = next((c["batch"] for k, c in results["cases"].items() if k.startswith("infer_224")), 32)
    lines = ["| configuration (fp32 unless stated) | this project | timm XCiT | speed-up |", "|---|---:|---:|---:|"]

    def add(case, ours, base, label, unit="img/s"):
        c = results["cases"].get(case)
        if not c or ours not in c["rows"] or base not in c["rows"]:
            return
        o, t = c["rows"][ours], c["rows"][base]
        if unit == "img/s":
            vo, vt = f"{c['batch'] / o['median_s']:.1f} img/s", f"{c['batch'] / t['median_s']:.1f} img/s"
        else:
            vo, vt = f"{o['median_s'] * 1e3:,.0f} ms", f"{t['median_s'] * 1e3:,.0f} ms"
        lines.append(f"| {label} | {vo} | {vt} | {o.get('speedup_vs_base', float('nan')):.2f}x |")

    add(f"infer_224_b{b}", "this-fused", "timm", f"inference 224, batch {b}, eager, fused")
    add(f"infer_224_b{b}", "this", "timm", f"inference 224, batch {b}, eager, not fused")
    add("infer_1024_b1", "this-fused", "timm", "inference 1024x1024, batch 1, eager, fused", unit="ms")
    add(f"compiled_224_b{b}", "this-fused-compiled", "timm-compiled", f"inference 224, batch {b}, both torch.compile")
    add("compiled_1024_b1", "this-fused-compiled", "timm-compiled", "inference 1024x1024, both torch.compile", unit="ms")
    add(f"bf16_224_b{b}", "this-fused-bf16", "timm", f"inference 224, batch {b}: this in bf16 autocast vs timm fp32")
    add(f"train_224_b{b}", "this", "timm", f"training step 224, batch {b} (forward, backward, AdamW)")
    r = _row(results, "infer_1024_b1", "this-fused")
    if r:
        lines.append(f"| share of the measured fp32 matmul peak at 1024x1024 (model FLOPs / time) | "
                     f"{r['gflops_per_s'] / peak:.0%} | {_row(results, 'infer_1024_b1', 'timm')['gflops_per_s'] / peak:.0%} | |")
    s512, s2048 = results["cases"].get("scale_512"), results["cases"].get("scale_2048")
    if s512 and s2048:
        def growth(k):
            if k not in s512["rows"] or k not in s2048["rows"]:
                return "-"
            g = (s2048["rows"][k]["median_s"] / s2048["tokens"]) / (s512["rows"][k]["median_s"] / s512["tokens"])
            return f"{g:.2f}x"
        lines.append(f"| time per token, 2048x2048 vs 512x512 (ViT of the same size: {growth('vit')}) | "
                     f"{growth('this-fused')} | {growth('timm')} | |")
    for res in (2048, 4096):
        c = results["cases"].get(f"scale_{res}")
        m = results.get("memory", {})
        if c and "this-fused" in c["rows"]:
            mo, mt = m.get(f"this-fused@{res}", {}), m.get(f"timm@{res}", {})
            t_timm = f"{c['rows']['timm']['median_s']:.1f} s" if "timm" in c["rows"] else "-"
            mem_t = f", +{mt['delta_mb']:,.0f} MB" if "delta_mb" in mt else ""
            sp = f"{c['rows']['this-fused']['speedup_vs_base']:.2f}x" if "speedup_vs_base" in c["rows"]["this-fused"] else ""
            lines.append(f"| {res}x{res} ({c['tokens']:,} tokens), batch 1: time, peak activation memory | "
                         f"{c['rows']['this-fused']['median_s']:.1f} s" + (f", +{mo['delta_mb']:,.0f} MB" if "delta_mb" in mo else "")
                         + f" | {t_timm}{mem_t} | {sp} |")
    return lines


def _case_table(results: dict, case: str, title: str) -> list[str]:
    c = results["cases"].get(case)
    if not c:
        return []
    peak = results["peak"]["gflops"]["fp32"]
    base = c["base"]
    lines = [f"**{title}** ({c['res']}x{c['res']}, batch {c['batch']}, {c['tokens']} tokens/image; {c['repeats']} "
             f"interleaved rounds; load average {c['load'][0]:.1f} -> {c['load'][1]:.1f})", "",
             f"| implementation | median ms | ms / image | images / s | x vs {base} (paired median) | GFLOP/s | of fp32 peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in c["rows"].items():
        sp = f"{r['speedup_vs_base']:.2f}" if "speedup_vs_base" in r else "1 (base)" if k == base else ""
        lines.append(f"| {LABELS.get(k, k)} | {_fmt_ms(r['median_s'])} | {_fmt_ms(r['per_image_s'])} | "
                     f"{c['batch'] / r['median_s']:.1f} | {sp} | {r['gflops_per_s']:.0f} | {r['gflops_per_s'] / peak:.0%} |")
    if "compile_s" in c:
        lines.append("")
        lines.append("Compile time (first call): " + ", ".join(f"{LABELS.get(k, k)} {v:.0f} s" for k, v in c["compile_s"].items()))
    return lines + [""]


def _scaling_table(results: dict) -> list[str]:
    cases = sorted((c for k, c in results["cases"].items() if k.startswith("scale_")), key=lambda c: c["res"])
    if not cases:
        return []
    mem = results.get("memory", {})
    lines = ["| resolution | tokens | this (fused) ms | timm ms | ViT ms | this µs/token | ViT µs/token | this x vs timm | "
             "peak MB this / timm / ViT |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        r = c["rows"]
        n = c["tokens"]

        def ms(k):
            return _fmt_ms(r[k]["median_s"]) if k in r else "-"

        def us(k):
            return f"{r[k]['median_s'] / n * 1e6:.1f}" if k in r else "-"

        def mb(k):
            m = mem.get(f"{k}@{c['res']}")
            if not m:
                return "-"
            return f"{m['delta_mb']:,.0f}" if "delta_mb" in m else "OOM" if "memory" in m.get("error", "") else "failed"

        sp = f"{r['this-fused']['speedup_vs_base']:.2f}" if "speedup_vs_base" in r.get("this-fused", {}) else "-"
        lines.append(f"| {c['res']} | {n:,} | {ms('this-fused')} | {ms('timm')} | {ms('vit')} | {us('this-fused')} | "
                     f"{us('vit')} | {sp} | {mb('this-fused')} / {mb('timm')} / {mb('vit')} |")
    return lines + [""]


def _analysis(results: dict) -> list[str]:
    """Numbers behind targets that were not met."""
    out = []
    peak = results["peak"]["gflops"]
    prof = results.get("profile", {})
    r = _row(results, "infer_1024_b1", "this-fused")
    if r and r["gflops_per_s"] / peak["fp32"] < 0.8:
        p = prof.get("1024_b1")
        exec_flops = results["flops"].get("xcit-exec@1024x1")
        line = (f"- **fp32 peak fraction at 1024**: model FLOPs {r['flops'] / 1e9:.0f} G in {r['median_s'] * 1e3:.0f} ms = "
                f"{r['gflops_per_s']:.0f} GFLOP/s against a measured peak of {peak['fp32']:.0f} GFLOP/s. "
                f"Even at the peak the matrix products alone need {r['flops'] / peak['fp32'] / 1e6:.0f} ms.")
        if exec_flops:
            line += (f" Executed FLOPs after folding: {exec_flops / 1e9:.0f} G "
                     f"({exec_flops / r['median_s'] / 1e9:.0f} GFLOP/s executed).")
        if p:
            tot = p["total"]
            line += (" Profiled time split (one profiled pass): " + ", ".join(
                f"{k} {v / tot:.0%}" for k, v in p.items() if k != "total" and v > 0) + ": the non-GEMM share "
                "(depthwise convolutions, LayerNorms, GELU, residual adds; memory-bound) caps the fraction at about "
                f"{(p['gemm'] + p['conv']) / tot:.0%} even if every GEMM ran at the peak.")
        out.append(line)
    bf = _row(results, next((k for k in results["cases"] if k.startswith("bf16_")), ""), "this-fused-bf16")
    if bf and bf.get("speedup_vs_base", 99) < 3:
        out.append(f"- **bf16 vs timm fp32**: {bf['speedup_vs_base']:.2f}x. The measured bf16 matmul peak is "
                   f"{peak.get('bf16', float('nan')):.0f} GFLOP/s vs fp32 {peak['fp32']:.0f} GFLOP/s (oneDNN) / "
                   f"{peak.get('fp32_blas', float('nan')):.0f} GFLOP/s (torch.mm, BLAS): bf16 units (avx512_bf16, "
                   "no AMX) give at most about "
                   f"{peak.get('bf16', 0) / max(peak.get('fp32_onednn', 1), 1):.1f}x over fp32 GEMMs, and the "
                   "element-wise work does not speed up.")
    return out


def render_appendix(results: dict) -> list[str]:
    m = results["machine"]
    if results.get("roofline") and not results.get("cases"):
        return [f"## Cross-check run: roofline ({results['date']})", "", "Reproduce with:", "", "```", results["command"],
                "```", "", _machine_line(results), ""] + roofline_table(results) + [""]
    clock = ("process CPU time, 1 thread" if results.get("clock") == "cpu" else f"wall time, {m['threads']} threads")
    lines = [f"## Cross-check run: {clock} ({results['date']})", "",
             "Reproduce with:", "", "```", results["command"], "```", "",
             f"Load average at start {m['load_start'][0]:.1f}, at end {m.get('load_end', [float('nan')])[0]:.1f}. "
             f"Matmul peak in that run: fp32 {results['peak']['gflops']['fp32']:.0f} GFLOP/s (oneDNN; BLAS "
             f"{results['peak']['gflops'].get('fp32_blas', float('nan')):.0f}), bf16 "
             f"{results['peak']['gflops'].get('bf16', float('nan')):.0f} GFLOP/s.", ""]
    lines += key_numbers(results) + ["", "| target | measured | goal | status | section |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(t) + " |" for t in targets(results)]
    return lines + [""]


def render(results: dict, plot_path: str | None = None, appendix: list[dict] | None = None) -> str:
    if results.get("roofline") and not results.get("cases"):
        return render_roofline(results, appendix)
    m = results["machine"]
    peak = results["peak"]["gflops"]
    lines = ["# Benchmark results", "",
             f"Model `{results['model']}`; run {results['date']} in {results['duration_s'] / 60:.0f} min.", "",
             "Reproduce with:", "", "```", results["command"], "```", "",
             "## Machine", "",
             f"- CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}; ISA: {', '.join(m['isa']) or '-'}; "
             + ", ".join(f"{k} {v}" for k, v in m.get("caches", {}).items()),
             f"- Memory: {m.get('memory_gib', '?')} GiB; GPU: {m['gpu'] or 'none (no GPU machine was lent to this run; the suite runs unchanged on one)'}",
             f"- Software: xcit {m.get('xcit', '-')}, Python {m['python']}, torch {m['torch']}, timm {m.get('timm', '-')}, "
             f"BLAS {m['blas']}, "
             f"oneDNN {'yes' if m['onednn'] else 'no'}; {m['platform']}",
             f"- Load average (1 min) at start {m['load_start'][0]:.1f}, at end {m.get('load_end', [float('nan')])[0]:.1f}: "
             "the machine is shared, so every comparison is interleaved and reported as a paired median.",
             "- Clock: " + ("process CPU time with one thread (robust to other processes on the cores; peaks and "
                            "models measured alike)" if results.get("clock") == "cpu" else "wall time (perf_counter)"),
             *(f"- Note: {n}" for n in results.get("notes", [])),
             "", "## Matmul peak (measured in this run)", "",
             "| kernel | GFLOP/s |", "|---|---:|",
             f"| fp32, torch.mm (BLAS) | {peak.get('fp32_blas', float('nan')):.0f} |",
             f"| fp32, oneDNN | {peak.get('fp32_onednn', float('nan')):.0f} |",
             f"| bf16, torch.mm (oneDNN) | {peak.get('bf16', float('nan')):.0f} |",
             "",
             f"Peak = best median over n x n x n products, n in {results['peak']['sizes']}. The fp32 peak used below is "
             f"the larger of the two fp32 rows ({peak['fp32']:.0f} GFLOP/s).", "",
             "## Summary", ""] + key_numbers(results) + ["",
             "## Targets", "", "| target | measured | goal | status | section |", "|---|---|---|---|---|"]
    for t in targets(results):
        lines.append("| " + " | ".join(t) + " |")
    analysis = _analysis(results)
    if analysis:
        lines += ["", "Where a target is not met:", ""] + analysis
    lines += ["", "## Inference, eager", ""]
    for k, c in results["cases"].items():
        if k.startswith("infer_"):
            lines += _case_table(results, k, "Eager inference, fp32")
    for prefix, title in (("bf16_", "bf16 autocast (baseline: timm fp32)"), ("train_", "Training step: forward + backward + AdamW, fp32"),
                          ("compiled_", "torch.compile (inductor), fp32")):
        cases = [k for k in results["cases"] if k.startswith(prefix)]
        if cases:
            lines += [f"## {title.split(' (')[0] if prefix != 'bf16_' else 'bf16 autocast'}", ""]
            for k in cases:
                lines += _case_table(results, k, title)
    lines += ["## Scaling with resolution (batch 1)", ""]
    if plot_path:
        lines += [f"![time per image and peak memory vs tokens]({plot_path})", ""]
    lines += _scaling_table(results)
    if results.get("profile"):
        lines += ["## Where the time goes (this project, fused, eager; one profiled pass)", "",
                  "| configuration | GEMM | convolutions | norms | softmax | other | total ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for k, p in results["profile"].items():
            t = p["total"]
            lines.append(f"| {k} | {p['gemm'] / t:.0%} | {p['conv'] / t:.0%} | {p['norm'] / t:.0%} | {p['softmax'] / t:.0%} | "
                         f"{p['other'] / t:.0%} | {t * 1e3:.0f} |")
        lines.append("")
    ag = results.get("bf16_agreement")
    lines += ["## bf16 agreement on Fashion-MNIST", ""]
    if ag:
        lines += [f"Checkpoint `{ag['checkpoint']}`, {ag['n']} test images at {ag['img_size']}px: top-1 predictions equal in "
                  f"{ag['agreement']:.2%} (top-1 accuracy fp32 {ag['top1_fp32']:.2%}, bf16 {ag['top1_bf16']:.2%}).", ""]
    else:
        lines += ["Not measured in this run: pass `--bf16-checkpoint runs/<run>/model.pth` (a model trained by `xcit train`), "
                  "or run `python benchmarks/bf16_agreement.py runs/<run>/model.pth`.", ""]
    lines += ["## Method", "",
              "- Each comparison runs its contenders in turn in one process (A, B, C, A, B, C, ...) after one untimed round; "
              "times are medians, speed-ups are the median over rounds of the per-round ratio.",
              "- Model FLOPs: `torch.utils.flop_counter` on the meta device, the reference algorithm (the plain model, which "
              "computes what timm computes); `GFLOP/s` = model FLOPs / median time, `of fp32 peak` = that / measured fp32 peak. "
              "This project executes fewer FLOPs than it is credited with where XCA folds its projections (N > C).",
              "- Peak memory: one fresh subprocess per (implementation, resolution) reads VmRSS, resets the high-water mark "
              "(`/proc/self/clear_refs`), runs one `inference_mode` forward pass and reports VmHWM minus the resident size "
              "before it (activations and workspaces; weights and input excluded).",
              "- `timm` is timm's XCiT with the same weights (its default XCA path, not the experimental fused one); the ViT "
              "is timm's `VisionTransformer` (DeiT layout, heads = C/64) with `F.scaled_dot_product_attention`.",
              "- Where torch's fp32 `mm` (MKL) runs below the oneDNN rate (compare the peak rows), `xcit.optimize` routes "
              "fp32 CPU linears and convolutions through oneDNN, part of its speed-up over timm; the rest comes from the "
              "algebra (folded projections, one-query class attention, fused GELU/BN/LayerScale). The plain model gains "
              "from the algebra that needs no bypass (Gram-matrix normalisation, channels-last stem and LPI).", ""]
    if results.get("roofline"):
        lines += ["## Roofline: this project's best path against every peer", ""] + roofline_section(results)
    for other in appendix or []:
        lines += render_appendix(other)
    return "\n".join(lines)


# -- the roofline preset ------------------------------------------------------------------------

BEST_PATH = {"fp32": "`xcit.optimize`", "bf16": "`xcit.optimize(dtype=bfloat16)`", "int8": "`xcit.quantize` (int8)"}
TRAIN_PATH = {"fp32": "default model, fused AdamW", "bf16": "default model, bf16 autocast, fused AdamW"}
RUNTIME_NAMES = {("openvino", "fp32"): "OpenVINO", ("openvino", "bf16"): "OpenVINO bf16",
                 ("openvino", "int8"): "OpenVINO + NNCF int8", ("onnxruntime", "fp32"): "ONNX Runtime",
                 ("onnxruntime", "int8"): "ONNX Runtime int8 (static QDQ)"}
PEAK_KERNELS = {"fp32": "the larger of fp32 torch.mm (BLAS) and oneDNN", "bf16": "bf16 torch.mm",
                "int8": "int8 torch._int_mm"}


def has_scaling(results: dict) -> bool:
    return any(k.startswith("scale_") for k in results.get("cases", {}))


def workload_name(row: dict) -> str:
    if row["workload"] == "train":
        return (f"training step {row['res']} b{row['batch']} (fwd + bwd + AdamW), "
                + ("fp32" if row["precision"] == "fp32" else "bf16 autocast"))
    return f"{row['res']} px batch {row['batch']}, {row['precision']}"


def contender_name(label: str, row: dict) -> str:
    """What ``label`` ran in ``row`` (its workload and precision), as the tables name it."""
    precision, train = row["precision"], row["workload"] == "train"
    if label == "this":
        return (TRAIN_PATH if train else BEST_PATH)[precision]
    if label == "timm":
        return "timm eager" + (", bf16 autocast" if precision == "bf16" else "")
    if label == "timm-inductor":
        return "timm + Inductor" + ("" if train else " (freezing)") + (", bf16 autocast" if precision == "bf16" else "")
    runtime, _, export = label.partition("@")
    name = RUNTIME_NAMES.get((runtime, precision), RUNTIME_NAMES.get((runtime, "fp32"), runtime))
    return f"{name}, {'our' if export == 'ours' else export + chr(39) + 's'} export"


def _fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.1f} ms"


def _share(c: dict) -> str:
    """The share of the row's peak; fp32 rows add the share of torch.mm's peak where it is the lower one."""
    if "share_of_peak" not in c:
        return "-"
    mm = f" ({c['share_of_mm_peak']:.0%} of torch.mm)" if "share_of_mm_peak" in c else ""
    return f"{c['share_of_peak']:.0%}{mm}"


def roofline_table(results: dict) -> list[str]:
    """The one table: per workload and precision, this project's best path, the best peer, their paired ratio
    and both shares of the matmul peak of that precision."""
    lines = ["| workload, precision | project best path | best peer | project / best peer | project share of peak | "
             "best peer share of peak | project's products alone (ceiling) |", "|---|---|---|---:|---:|---:|---:|"]
    for row in results["roofline"]["rows"].values():
        c = row["contenders"]
        this = c.get("this")
        ours = f"{contender_name('this', row)} {_fmt_s(this['median_s'])}" if this else \
            f"{contender_name('this', row)}: {row['skipped'].get('this', 'not measured')}"
        peer = row.get("best_peer")
        theirs = f"{contender_name(peer, row)} {_fmt_s(c[peer]['median_s'])}" if peer else "-"
        ratio = f"{row['this_vs_best_peer']:.2f}x" if "this_vs_best_peer" in row else "-"
        lines.append(f"| {workload_name(row)} | {ours} | {theirs} | {ratio} | {_share(this) if this else '-'} | "
                     f"{_share(c[peer]) if peer else '-'} | {_ceiling(row)} |")
    return lines


def _ceiling(row: dict) -> str:
    """The project's products time (profiled) and the share of peak it leaves room for: ``0.45 s (82%)``."""
    prod = row.get("this_products")
    if not prod or "products_s" not in prod:  # not measured (an older results file) or the profile failed
        return "-"
    share = f" ({prod['ceiling_share']:.0%})" if "ceiling_share" in prod else ""
    return f"{_fmt_s(prod['products_s'])}{share}"


def export_table(results: dict) -> list[str]:
    """OpenVINO and ONNX Runtime on this project's ONNX export against the same runtime on timm's, paired (with
    the range of the per-round ratios)."""
    lines = ["| runtime, workload, precision | on our export | on timm's export | ours / timm's (paired; rounds' range) | "
             "at least as fast |", "|---|---:|---:|---:|---|"]
    for row in results["roofline"]["rows"].values():
        for runtime, ratio in row.get("export_ratio", {}).items():
            ours, theirs = row["contenders"][runtime + "@ours"], row["contenders"][runtime + "@timm"]
            rounds = [t / o for t, o in zip(theirs["times"], ours["times"])]
            name = RUNTIME_NAMES.get((runtime, row["precision"]), runtime)
            lines.append(f"| {name}, {workload_name(row)} | {_fmt_s(ours['median_s'])} | {_fmt_s(theirs['median_s'])} | "
                         f"{ratio:.2f}x ({min(rounds):.2f}-{max(rounds):.2f}) | {'yes' if ratio >= 1 else '**no**'} |")
    return lines


def _machine_line(results: dict) -> str:
    m = results["machine"]
    clock = ("process CPU time, one thread" if results.get("clock") == "cpu" else "wall time")
    return (f"CPU: {m['cpu']} ({m.get('cpu_id', '?')}; flags: {', '.join(m.get('cpu_flags', [])) or 'none of avx512 / amx'}); "
            f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}; clock: {clock}; model `{results.get('model', '?')}`.")


def roofline_summary(results: dict) -> list[str]:
    """What ``xcit bench --preset roofline`` prints at the end: the machine, the peaks and the two tables."""
    peak = results["peak"]["gflops"]
    return ["", _machine_line(results),
            "Matmul peaks (n = 2048): " + ", ".join(f"{k} {peak[k]:.0f}" for k in ("fp32", "bf16", "int8") if k in peak)
            + " G(FL)OP/s.", ""] + roofline_table(results) + [""] + export_table(results) + [""]


def roofline_section(results: dict) -> list[str]:
    roof = results["roofline"]
    peak = results["peak"]["gflops"]
    lines = roofline_table(results) + ["",
             "Project / best peer: the median over rounds of t(best peer) / t(project) in the same round (> 1: the project "
             "is faster); best peer: the fastest (median) of every other contender of the row; share of peak: model FLOPs "
             "/ median time / the matmul peak of the row's precision measured in this run; products alone: the self time "
             "of the project's GEMMs, batched products and convolutions (fused epilogues included) in one profiled call "
             "after the timed rounds, the least of two, and in brackets the model FLOPs / that time / the peak: the share "
             "the project's path would reach if everything but its products took no time (a ceiling for these product "
             "kernels).", "",
             "### Runtimes on this project's export and on timm's", ""] + export_table(results) + ["",
             "### Every contender", "",
             "| workload, precision | contender | median | min | share of peak | t / t(project), paired | set-up (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in roof["rows"].values():
        for label, c in row["contenders"].items():
            ratio = f"{c['this_speedup']:.2f}x" if "this_speedup" in c else "1 (project)" if label == "this" else "-"
            lines.append(f"| {workload_name(row)} | {contender_name(label, row)} | {_fmt_s(c['median_s'])} | "
                         f"{_fmt_s(c['min_s'])} | {_share(c)} | {ratio} | {c['setup_s']:.0f} |")
    lines += ["", "Set-up: wall time of building the contender and its first call (torch.compile / Inductor, "
              "`xcit.quantize`'s calibration and compile, NNCF or ONNX Runtime quantisation, OpenVINO compile_model), "
              "excluded from the timings. Every row also had one untimed warm-up round.", ""]
    skipped = [f"- {workload_name(row)}: {contender_name(label, row)}: {why}"
               for row in roof["rows"].values() for label, why in row.get("skipped", {}).items()]
    if skipped or roof.get("notes"):
        lines += ["### Left out", ""] + [f"- {n}" for n in roof.get("notes", [])] + skipped + [""]
    from .contenders import RUNTIME_SETUP

    lines += ["### Contenders", "",
              f"- project: {BEST_PATH['fp32']} for fp32, the same under `torch.autocast('cpu', dtype=torch.bfloat16)` for "
              "bf16, `xcit.quantize(model, calibration images)` for int8 (PT2E x86 quantizer, Inductor int8 kernels; "
              "calibrated at the row's input size); training: the plain `create_model` model "
              "(`xcit.bench.contenders.best_path`).",
              "- timm eager: timm's XCiT with the same weights; bf16 rows under the same autocast.",
              "- timm + Inductor: `torch.compile(model, dynamic=False)`; inference with "
              "`torch._inductor.config.freezing=True`, training plain (the AdamW step eager).",
              "- OpenVINO and ONNX Runtime: inference only (no training rows).",
              "- exports: this project's plain model through `xcit.export.export_onnx` (torchscript exporter, opset "
              "18, dynamic batch / height / width); timm's model through `torch.onnx.export` with the same exporter "
              "and options (`xcit.bench.contenders.export_timm_onnx`)."]
    lines += [f"- {RUNTIME_NAMES[key]}: {text}" for key, text in RUNTIME_SETUP.items()]
    lines += [f"- int8 calibration images (the same for every int8 contender of a size): "
              + "; ".join(f"{res} px: {what}" for res, what in roof.get("calibration", {}).items())]
    lines += [f"- peaks: {', '.join(f'{k}: {PEAK_KERNELS[k]}' for k in ('fp32', 'bf16', 'int8'))}, n = 2048, "
              f"measured in this run: fp32 {peak.get('fp32', float('nan')):.0f} GFLOP/s (torch.mm "
              f"{peak.get('fp32_blas', float('nan')):.0f}, oneDNN {peak.get('fp32_onednn', float('nan')):.0f}), bf16 "
              f"{peak.get('bf16', float('nan')):.0f} GFLOP/s, int8 {peak.get('int8', float('nan')):.0f} GOP/s"
              + (f" ({results['peak']['int8_error']})" if "int8_error" in results["peak"] else "") + ". "
              "Where torch.mm's fp32 peak is the lower one, fp32 shares also give the share of it in brackets "
              "(the peak defined as single-thread torch.mm at 2048^3 alone, whatever library serves it).",
              "- FLOPs: 2 x the multiply-accumulates of the reference computation (`xcit.models.complexity.count_macs`, "
              "the same count as `torch.utils.flop_counter` on the plain model); training step: 3 x the forward.",
              "- Contenders of a row run in turn in one process (A, B, C, A, B, C, ...); times are medians.", ""]
    return lines


def render_roofline(results: dict, appendix: list[dict] | None = None) -> str:
    m = results["machine"]
    versions = results["roofline"].get("versions", {})
    lines = ["# Roofline: this project's best path against every peer", "",
             f"Model `{results['model']}`; run {results['date']} in {results['duration_s'] / 60:.0f} min.", "",
             "Reproduce with:", "", "```", results["command"], "```", "",
             "## Machine", "",
             f"- CPU: {m['cpu']} ({m.get('cpu_id', '?')}), {m['cores']} cores; flags: "
             f"{', '.join(m.get('cpu_flags', [])) or 'none of avx512 / amx'}; ISA: {', '.join(m['isa']) or '-'}; "
             + ", ".join(f"{k} {v}" for k, v in m.get("caches", {}).items()),
             f"- Threads: {m['threads']} (torch, OpenVINO, ONNX Runtime); clock: "
             + ("process CPU time, one thread" if results.get("clock") == "cpu" else "wall time (perf_counter)"),
             f"- Software: xcit {m.get('xcit', '-')}, Python {m['python']}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f"; {m['platform']}",
             f"- Load average (1 min) at start {m['load_start'][0]:.1f}, at end {m.get('load_end', [float('nan')])[0]:.1f}",
             "", "## The table", ""] + roofline_section(results)
    for other in appendix or []:
        lines += render_appendix(other)
    return "\n".join(lines)


def plot_scaling(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted((c for k, c in results["cases"].items() if k.startswith("scale_")), key=lambda c: c["res"])
    if not cases:
        return
    mem = results.get("memory", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"this-fused": ("XCiT, this project (fused)", "C0", "o"), "timm": ("XCiT, timm", "C1", "s"),
              "vit": ("ViT, same width/depth (SDPA)", "C3", "^")}
    for key, (label, color, marker) in styles.items():
        pts = [(c["tokens"], c["rows"][key]["median_s"] * 1e3) for c in cases if key in c["rows"]]
        if pts:
            ax1.loglog(*zip(*pts), marker=marker, color=color, label=label)
        mpts = [(m["tokens"], m["delta_mb"]) for m in mem.values() if m.get("impl") == key and "delta_mb" in m]
        if mpts:
            ax2.loglog(*zip(*sorted(mpts)), marker=marker, color=color, label=label)
    n0 = cases[0]["tokens"]
    n1 = cases[-1]["tokens"]
    if "this-fused" in cases[0]["rows"]:
        t0 = cases[0]["rows"]["this-fused"]["median_s"] * 1e3
        ax1.loglog([n0, n1], [t0, t0 * n1 / n0], ":", color="gray", label="slope 1 (linear)")
        ax1.loglog([n0, n1], [t0, t0 * (n1 / n0) ** 2], "--", color="lightgray", label="slope 2 (quadratic)")
    ax1.set_xlabel("tokens per image (N)")
    ax1.set_ylabel("time per image (ms)")
    ax1.set_title("Inference time, batch 1, fp32")
    ax2.set_xlabel("tokens per image (N)")
    ax2.set_ylabel("peak memory of the forward pass (MB)")
    ax2.set_title("Peak memory, batch 1, fp32")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    n = results["machine"]["threads"]
    fig.suptitle(f"{results['model']} on {results['machine']['cpu']} ({n} thread{'s' if n != 1 else ''})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
