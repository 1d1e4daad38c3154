"""`xcit bench`: the options of the benchmark suite; the suite itself is :mod:`xcit.bench`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import POSITIVE, add_config_option, add_overwrite_option


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench.suite import PRESETS

    p = sub.add_parser(
        "bench", help="inference/training throughput, peak memory and scaling vs timm's XCiT and a ViT",
        description="Benchmark suite (see benchmarks/README.md). Writes a markdown report, a PNG plot and JSON. "
                    "--preset roofline: one table of this project's best path per precision against every peer "
                    "(timm eager / Inductor, OpenVINO, NNCF, ONNX Runtime), as shares of the measured matmul peaks.",
    )
    p.add_argument("--model", default="xcit_small_12_p16", help="XCiT architecture (default xcit_small_12_p16)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="full (default), quick (a few minutes), roofline (the best path per precision against every "
                        "peer, no plot)")
    p.add_argument("--sizes", type=POSITIVE, nargs="+", default=None,
                   help="scaling resolutions (batch 1; roofline: its batch-1 inference rows, default 1024); "
                        "overrides the preset")
    p.add_argument("--batch", type=POSITIVE, default=None,
                   help="batch of the 224 comparisons (default: the preset's, 32; roofline 16)")
    p.add_argument("--repeats", type=POSITIVE, default=None, help="timed rounds per comparison (default: preset)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's, i.e. all cores)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter (default); cpu: process CPU time, with --threads 1 only - robust to other "
                        "processes competing for the cores on a shared machine")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparisons (roofline: timm + Inductor)")
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
    add_overwrite_option(p, "replace existing --out, --plot and --json files (the repository's own "
                            "benchmarks/RESULTS.md included)")
    add_config_option(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import BenchSettings, render_files, run_suite
    from ..bench.suite import writes_plot

    out = args.out
    plot = args.plot or out.with_name("scaling.png")
    if args.render:
        drawn = render_files(args.render, out, plot=plot, appendix=args.appendix, overwrite=args.overwrite)
        print(f"wrote {out}, {drawn}" if drawn else f"wrote {out}")
        return 0
    settings = BenchSettings(
        model=args.model, preset=args.preset, sizes=args.sizes, batch=args.batch, repeats=args.repeats,
        threads=args.threads, clock=args.clock, compile=not args.no_compile, train=not args.no_train,
        memory=not args.no_memory, bf16_checkpoint=args.bf16_checkpoint,
    )
    raw = args.json or out.with_name("results.json")
    command = "xcit bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else "xcit bench"
    run_suite(settings, out, plot=plot, raw=raw, command=command, overwrite=args.overwrite)
    print(f"wrote {out}, {plot}, {raw}" if writes_plot(args.preset) else f"wrote {out}, {raw}")
    return 0
