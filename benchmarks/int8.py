"""int8 post-training quantisation (``xcit.quantize``): accuracy on Fashion-MNIST and speed at 224 px.

Accuracy: a trained Fashion-MNIST checkpoint (``--checkpoint``, e.g. a run's model.pth) in fp32 and
int8 (calibrated on ``--calibration-images`` training images, compiled) on the 10k test images:
top-1 of each, top-1 agreement and the accuracy drop.

Speed: at 224 px, batch ``--batch``, random weights (BatchNorm statistics perturbed), per model:
the plain fp32 model, ``xcit.optimize`` in fp32, ``xcit.optimize`` under bf16 autocast, and int8
(calibrated on 32 random images, compiled with Inductor). Each round times one forward of every
contender in turn (process CPU time, interleaved); medians and paired ratios (median over rounds
of t_other / t_int8). Pin it to one core:

    taskset -c 0 .venv/bin/python benchmarks/int8.py --checkpoint runs/fmnist/model.pth --threads 1

Writes benchmarks/int8.json and appends a markdown section to benchmarks/RESULTS.md (``--no-append``
to only print it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from xcit.bench.timing import cpu_identity

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def accuracy(checkpoint: str, n_calibration: int) -> dict:
    import xcit
    from xcit.data import BatchEvalTransform, build_dataset, calibration_images
    from xcit.inference import load_for_inference
    from xcit.models.quantize import agreement

    inf = load_for_inference(checkpoint)
    model = inf.model.cpu().eval()
    size = inf.img_size[0]
    tf = BatchEvalTransform(size, crop_pct=inf.crop_pct, mean=inf.mean, std=inf.std, interpolation=inf.interpolation)
    test = build_dataset("fashion-mnist", "val")
    x, y = tf(test.images), test.targets
    cal = calibration_images("fashion-mnist", n_calibration, in_chans=inf.in_chans, batch_transform=tf,
                             image_transform=inf.transform(), split="train")
    t0 = time.perf_counter()
    qmodel = xcit.quantize(model, cal, batch_size=250)
    quantize_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = torch.cat([model(x[i:i + 250]) for i in range(0, len(x), 250)])
        got = torch.cat([qmodel(x[i:i + 250]) for i in range(0, len(x), 250)])
        emulated = torch.cat([qmodel.program(x[i:i + 250]) for i in range(0, len(x), 250)])
    top1 = lambda logits: 100.0 * float((logits.argmax(1) == y).float().mean())
    row = {"checkpoint": checkpoint, "img_size": size, "test_images": len(x), "calibration_images": len(cal),
           "fp32_top1": top1(ref), "int8_top1": top1(got), "agreement": agreement(ref, got),
           "int8_qdq_top1": top1(emulated), "int8_qdq_agreement": agreement(ref, emulated),
           "max_abs_logit_diff": float((ref - got).abs().max()), "quantize_and_compile_s": quantize_s}
    row["drop_points"] = row["fp32_top1"] - row["int8_top1"]
    return row


def speed(name: str, batch: int, rounds: int) -> dict:
    import xcit

    torch.manual_seed(0)
    model = xcit.create_model(name).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(batch, 3, 224, 224)
    optimized = xcit.optimize(model)
    t0 = time.perf_counter()
    qmodel = xcit.quantize(model, torch.randn(32, 3, 224, 224), batch_size=batch)
    compile_s = time.perf_counter() - t0

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return optimized(x)

    contenders = {"fp32_plain": lambda: model(x), "fp32_optimized": lambda: optimized(x), "bf16_optimized": bf16,
                  "int8": lambda: qmodel(x)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.no_grad():
        for fn in contenders.values():  # warm-up (the int8 model compiles for this batch size here)
            fn()
        for r in range(rounds):
            for k, fn in contenders.items():
                t = time.process_time()
                fn()
                times[k].append(time.process_time() - t)
            log(f"{name} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
        agree = float((model(x).argmax(1) == qmodel(x).argmax(1)).float().mean()) * 100
    return {
        "model": name, "batch": batch, "img_size": 224, "rounds": rounds, "quantize_and_compile_s": compile_s,
        "median_s": {k: statistics.median(v) for k, v in times.items()}, "times": times,
        "int8_speedup": {k: statistics.median(a / b for a, b in zip(times[k], times["int8"])) for k in contenders if k != "int8"},
        "random_input_agreement": agree,
    }


def markdown(res: dict) -> str:
    lines = [f"## int8 post-training quantisation ({res['date']})", "",
             f"Command: `{res['command']}`", "",
             (f"CPU: {res['cpu']} ({res['cpu_family_model']}), flags {', '.join(res['cpu_flags']) or 'none'}; "
             f"{res['threads']} thread(s); torch {res['torch']}, torchao {res['torchao']}. "
             "This VM exposes no AMX (no amx_* flags): the oneDNN int8 kernels run on AVX-512 VNNI here, so the "
             "issue's speed target (>= 1.5x the optimised bf16 model on the AMX machine) and the AMD figure could not "
             "be measured; the ratios below are this CPU's."), ""]
    acc = res.get("accuracy")
    if acc:
        lines += [("Accuracy on the Fashion-MNIST test set (10,000 images), "
                  f"calibrated on {acc['calibration_images']} training images, `{acc['checkpoint']}`:"), "",
                  "| fp32 top-1 | int8 top-1 | drop (points) | top-1 agreement | int8 Q/DQ (uncompiled) agreement | max abs logit diff |",
                  "|---:|---:|---:|---:|---:|---:|",
                  (f"| {acc['fp32_top1']:.2f}% | {acc['int8_top1']:.2f}% | {acc['drop_points']:+.2f} | "
                  f"{acc['agreement']:.2f}% | {acc['int8_qdq_agreement']:.2f}% | {acc['max_abs_logit_diff']:.3f} |"), ""]
    if res.get("speed"):
        lines += ["Speed at 224 px, random weights, process CPU time, median of interleaved rounds:", "",
                  ("| model | batch | fp32 plain | fp32 optimised | bf16 optimised | int8 | int8 vs fp32 plain | "
                  "vs fp32 optimised | vs bf16 optimised | quantise + compile |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["speed"]:
            m, sp = s["median_s"], s["int8_speedup"]
            lines.append(f"| {s['model']} | {s['batch']} | {m['fp32_plain'] * 1e3:.0f} ms | {m['fp32_optimized'] * 1e3:.0f} ms | "
                         f"{m['bf16_optimized'] * 1e3:.0f} ms | {m['int8'] * 1e3:.0f} ms | {sp['fp32_plain']:.2f}x | "
                         f"{sp['fp32_optimized']:.2f}x | {sp['bf16_optimized']:.2f}x | {s['quantize_and_compile_s']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="trained Fashion-MNIST model.pth (skips accuracy if absent)")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--models", nargs="*", default=["xcit_nano_12_p16", "xcit_small_12_p16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "int8.json"))
    p.add_argument("--no-append", action="store_true", help="print the markdown instead of appending it to RESULTS.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from importlib.metadata import version

    cpu = cpu_identity()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "taskset -c 0 python " + " ".join(["benchmarks/int8.py", *sys.argv[1:]]),
           "cpu": cpu["cpu"], "cpu_family_model": cpu["cpu_id"], "cpu_flags": cpu["cpu_flags"], "threads": a.threads,
           "torch": torch.__version__, "torchao": version("torchao")}
    if a.checkpoint:
        log(f"accuracy with {a.checkpoint}")
        res["accuracy"] = accuracy(a.checkpoint, a.calibration_images)
        log(json.dumps({k: v for k, v in res["accuracy"].items() if k != "checkpoint"}))
    res["speed"] = []
    for name in a.models:
        log(f"speed {name} at 224, batch {a.batch}")
        res["speed"].append(speed(name, a.batch, a.rounds))
    Path(a.out).write_text(json.dumps(res, indent=1))
    md = markdown(res)
    if a.no_append:
        print(md)
    else:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + md)
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
