"""Where the bf16 inference time goes, per kind of operation, for timm's XCiT and this project's models.

One profiled forward (after a warm-up) under ``torch.autocast("cpu", dtype=torch.bfloat16)`` of
timm's XCiT, this project's plain model and its ``xcit.optimize`` copy (same weights), at 224 batch
16 and 1024x1024 batch 1; the self CPU time of every operator is put in one group (GEMM, depthwise
convolution = LPI, other convolution = stem / positional encoding, norm, softmax, GELU, dtype casts,
layout copies, elementwise, other). Pin it to one core:

    taskset -c 0 .venv/bin/python benchmarks/bf16_profile.py --threads 1

Prints a markdown table per case (pasted into RESULTS.md) and writes benchmarks/bf16_profile.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_module import build, cpu_family_model, cpu_name  # noqa: E402  (the same contenders and weights)

GROUPS = (  # first match wins; keys are substrings of profiler operator names
    ("GEMM", ("addmm", "aten::mm", "bmm", "_linear_pointwise", "aten::linear", "matmul")),
    ("depthwise conv (LPI)", ()),  # decided by shape below
    ("conv (stem, pos. enc.)", ("conv",)),
    ("norm", ("layer_norm", "batch_norm", "vector_norm", "aten::norm")),
    ("softmax", ("softmax",)),
    ("GELU", ("gelu",)),
    ("dtype casts", ("aten::to", "_to_copy")),
    ("layout copies", ("copy_", "contiguous", "clone", "aten::cat", "aten::stack")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "addcmul", "aten::sub", "aten::sum", "sqrt", "clamp")),
)


def _group(name: str, shapes) -> str:
    if "conv" in name and shapes and len(shapes) > 1 and shapes[1] and len(shapes[1]) == 4 and shapes[1][1] == 1:
        return "depthwise conv (LPI)"
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def breakdown(model, x) -> dict[str, float]:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    out: dict[str, float] = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        g = _group(ev.key, ev.input_shapes)
        out[g] = out.get(g, 0.0) + ev.self_cpu_time_total / 1e3
    out["total"] = sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xcit_small_12_p16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "bf16_profile.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        models = build(args.model, None, Path(tmp))
    gen = torch.Generator().manual_seed(0)
    cases = {f"224, batch {args.batch}": torch.randn(args.batch, 3, 224, 224, generator=gen),
             "1024x1024, batch 1": torch.randn(1, 3, 1024, 1024, generator=gen)}
    results = {case: {name: breakdown(m, x) for name, m in models.items()} for case, x in cases.items()}
    command = "taskset -c 0 .venv/bin/python benchmarks/bf16_profile.py " + " ".join(sys.argv[1:])
    record = {"cpu": cpu_name(), "cpu_id": cpu_family_model(), "torch": torch.__version__, "model": args.model,
              "threads": args.threads, "command": command.strip(), "results": results,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).write_text(json.dumps(record, indent=1))
    groups = [g for g, _ in GROUPS] + ["other"]
    print(f"{args.model}, bf16 autocast, {args.threads} thread(s), self CPU time of one profiled forward in ms "
          f"(share of the total); {record['cpu']} ({record['cpu_id']}); `{record['command']}`")
    for case, per_model in results.items():
        names = list(per_model)
        print(f"\n{case}\n\n| operations | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for g in groups + ["total"]:
            cells = []
            for n in names:
                v = per_model[n].get(g, 0.0)
                cells.append(f"{v:,.0f}" + ("" if g == "total" else f" ({100 * v / per_model[n]['total']:.0f}%)"))
            print(f"| {g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
