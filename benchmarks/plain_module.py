"""The plain model and the inference transform against timm and against an earlier version of this project.

Contenders, all with the same weights (xcit_small_12_p16 by default, seed 0, BatchNorm statistics
perturbed): timm's XCiT (fp32, eager), this project's plain ``create_model`` model, its inference
transform ``xcit.optimize(model)``, and the fused model of an earlier commit (``--baseline REV``,
default the last commit before the plain-module change; its ``xcit/models`` package is read with
``git show`` and imported under another name). Each round times one forward of every contender in
turn (process CPU time, interleaved), so machine noise falls on all of them alike; the table gives
medians and ratios, and splits the same rounds into user time, system time and minor page faults
(glibc hands big tensors back to the OS and the next forward faults them in again: system time
that moves between runs; the kernel splits user from system time by sampling at its clock tick, so
the split means something for forwards of many ticks, as here, not for tiny ones). ``--parts`` adds
the CPU time per submodule kind of timm and the plain model (forward hooks). Pin it to one core:

    taskset -c 0 .venv/bin/python benchmarks/plain_module.py --threads 1 --rounds 15 --parts

Writes benchmarks/plain_module.json and prints a markdown table (pasted into RESULTS.md).
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xcit.bench.contenders import perturb_bn
from xcit.bench.timing import cpu_identity

ROOT = Path(__file__).resolve().parents[1]
PART_ROUNDS = 3  # forwards averaged by --parts
DEFAULT_BASELINE = "d2cf1f5"  # main before the plain-module change: layers with the fast path, model.fuse()


def cpu_name() -> str:
    return cpu_identity()["cpu"]


def cpu_family_model() -> str:
    return cpu_identity()["cpu_id"]


def load_baseline(rev: str, workdir: Path):
    """The ``xcit.models`` package of commit ``rev`` as the importable package ``xcit_baseline_models``."""
    pkg = workdir / "xcit_baseline_models"
    pkg.mkdir()
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:src/xcit/models"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/xcit/models/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (pkg / name).write_text(text)
    sys.path.insert(0, str(workdir))
    return importlib.import_module("xcit_baseline_models")


def build(model_name: str, baseline_rev: str | None, workdir: Path) -> dict:
    import timm
    from timm.models.xcit import checkpoint_filter_fn

    import xcit

    torch.manual_seed(0)
    plain = xcit.create_model(model_name)
    perturb_bn(plain)
    plain.eval()
    state = plain.state_dict()
    ref = timm.create_model(model_name + "_224", pretrained=False)
    ref.load_state_dict(checkpoint_filter_fn({"model": dict(state)}, ref))  # the filter edits its input
    models = {"timm": ref.eval(), "plain": plain, "optimized": xcit.optimize(plain)}
    if baseline_rev:
        old = load_baseline(baseline_rev, workdir)
        fused = old.create_model(model_name)
        fused.load_state_dict(state)
        models["baseline-fused"] = fused.eval().fuse()
    return models


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def run_case(models: dict, x: torch.Tensor, rounds: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in models}
    user: dict[str, list[float]] = {k: [] for k in models}
    system: dict[str, list[float]] = {k: [] for k in models}
    faults: dict[str, list[int]] = {k: [] for k in models}
    outputs = {}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up, and the outputs for the agreement column
            outputs[name] = m(x).float()
        names = list(models)
        for r in range(rounds):  # every other round in reverse order: no contender always runs first
            for name in (names if r % 2 == 0 else names[::-1]):
                u0, s0, f0 = _usage()
                t0 = time.process_time()
                models[name](x)
                times[name].append(time.process_time() - t0)
                u1, s1, f1 = _usage()
                user[name].append(u1 - u0)
                system[name].append(s1 - s0)
                faults[name].append(f1 - f0)
    ref = outputs["plain"]
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(series: dict[str, list[float]], name: str) -> float:
        """Median over rounds of timm's time / this contender's time in the same round (nan: no usable round)."""
        ratios = [t / o for t, o in zip(series["timm"], series[name]) if o > 0]
        return statistics.median(ratios) if ratios else float("nan")

    return {
        name: {"median_s": med[name], "times_s": times[name], "vs_timm": med["timm"] / med[name],
               "vs_timm_paired": paired(times, name),
               # the same ratio on user time alone: kernel time spent on fresh pages (page faults) left out
               "vs_timm_paired_user": paired(user, name),
               "median_user_s": statistics.median(user[name]), "median_system_s": statistics.median(system[name]),
               "median_minor_faults": statistics.median(faults[name]),
               "max_abs_logit_diff_vs_plain": float((outputs[name] - ref).abs().max())}
        for name in models
    }


def part_times(models: dict, x: torch.Tensor, rounds: int = PART_ROUNDS) -> dict[str, dict[str, float]]:
    """CPU ms per forward spent in each kind of submodule (summed over blocks), through forward hooks.

    Keys name the official module paths with block indices replaced by ``*`` (timm's own names for
    its split class-attention projections); nested entries include their children.
    """
    out: dict[str, dict[str, float]] = {}
    for label in ("timm", "plain"):
        model, acc, start, handles = models[label], {}, {}, []
        for name, module in model.named_modules():
            key = re.sub(r"^(blocks|cls_attn_blocks)\.\d+", r"\1.*", name)
            if key.count(".") > 3:
                continue

            def pre(_m, _i, key=key):
                start[key] = time.thread_time()

            def post(_m, _i, _o, key=key):
                acc[key] = acc.get(key, 0.0) + time.thread_time() - start[key]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        with torch.inference_mode():
            model(x)
            acc.clear()
            for _ in range(rounds):
                model(x)
        for h in handles:
            h.remove()
        out[label] = {k or "(whole model)": v / rounds * 1000 for k, v in acc.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xcit_small_12_p16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=16, help="batch of the 224 case (default 16)")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the earlier fused model ('' to skip)")
    ap.add_argument("--parts", action="store_true",
                    help="also split one forward of timm and the plain model into submodule times (224 case)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "plain_module.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = build(args.model, args.baseline or None, Path(tmp))
        gen = torch.Generator().manual_seed(0)
        cases = {f"224, batch {args.batch}": torch.randn(args.batch, 3, 224, 224, generator=gen),
                 "1024x1024, batch 1": torch.randn(1, 3, 1024, 1024, generator=gen)}
        results = {}
        for label, x in cases.items():
            print(f"[bench] {label} ...", file=sys.stderr, flush=True)
            results[label] = run_case(models, x, args.rounds)
        parts = part_times(models, next(iter(cases.values()))) if args.parts else None
    command = "taskset -c 0 .venv/bin/python benchmarks/plain_module.py " + " ".join(sys.argv[1:])
    record = {"cpu": cpu_name(), "cpu_id": cpu_family_model(), "torch": torch.__version__, "threads": args.threads,
              "model": args.model, "rounds": args.rounds, "baseline": args.baseline, "command": command.strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    if parts:
        record["parts_ms_224"] = parts
    Path(args.out).write_text(json.dumps(record, indent=1))
    labels = {"timm": "timm XCiT, fp32", "plain": "this project, plain `create_model` model",
              "optimized": "this project, `xcit.optimize(model)`",
              "baseline-fused": f"this project at {args.baseline}, `model.fuse()` (before the plain-module change)"}
    heads = list(cases)
    print(f"\n{args.model}, fp32, {args.threads} thread(s), process CPU time, median of {args.rounds} interleaved "
          f"rounds (order reversed every other round); ratio: median of the per-round timm / contender times; "
          f"{record['cpu']} ({record['cpu_id']}); `{record['command']}`\n")
    print("| | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    for name in models:
        cells = [f"{results[h][name]['median_s']:.3f} s ({results[h][name]['vs_timm_paired']:.2f}x timm)" for h in heads]
        print(f"| {labels[name]} | " + " | ".join(cells) + " |")
    print("\nThe same rounds split: user time only (ratio of the per-round user times), system time and minor page "
          "faults per forward (fresh pages from the allocator):\n")
    print("| | " + " | ".join(f"{h}: user (ratio) / system / faults" for h in heads) + " |")
    print("|---|" + "---:|" * len(heads))
    for name in models:
        cells = [f"{r['median_user_s']:.3f} s ({r['vs_timm_paired_user']:.2f}x) / {r['median_system_s']:.3f} s / "
                 f"{r['median_minor_faults'] / 1000:.0f}k" for r in (results[h][name] for h in heads)]
        print(f"| {labels[name]} | " + " | ".join(cells) + " |")
    if parts:
        print(f"\nWhere the time goes, {heads[0]} (ms of thread CPU time per forward, forward hooks, "
              f"{PART_ROUNDS} forwards):\n")
        print("| submodule | timm | plain | timm / plain |")
        print("|---|---:|---:|---:|")
        for key in sorted(set(parts["timm"]) | set(parts["plain"])):
            a, b = parts["timm"].get(key, 0.0), parts["plain"].get(key, 0.0)
            if max(a, b) >= 1.0:
                print(f"| `{key}` | {a:.1f} | {b:.1f} | " + (f"{a / b:.2f}" if a and b else "") + " |")


if __name__ == "__main__":
    main()
