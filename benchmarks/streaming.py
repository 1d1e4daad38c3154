"""Peak memory and time per token of the streaming forward (``xcit.streaming``) vs the plain ``model(x)``.

    taskset -c 1 python benchmarks/streaming.py --sizes 1024 2048 4096 8192 16384 --plain-max 8192

Each case (implementation x resolution) runs in its own subprocess, so its peak RSS (``ru_maxrss``,
whole process: weights, libraries and the input included) is its own. The input is a random uint8
(H, W, 3) image in a ``.npy`` file: the streaming forward reads it memory-mapped and normalises tile by
tile; the plain forward gets the normalised float (1, 3, H, W) tensor, as a user would build it.
Time is the process CPU time of the forward with one torch thread (robust to other processes on the
core). Cases run interleaved (plain, streaming at each size, ``--rounds`` times up to ``--repeat-max``).
Random weights (the cost does not depend on them). Writes ``streaming.json``, ``streaming.png`` and
``streaming.md`` (the table for RESULTS.md) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _case(mode: str, size: int, image: str, model_name: str, chunk: int) -> dict:
    """One measurement in this (fresh) process."""
    import numpy as np
    import torch

    import xcit
    from xcit.data.images import IMAGENET_MEAN, IMAGENET_STD
    from xcit.inference.streaming import normalise

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = xcit.create_model(model_name).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))  # warm-up: allocator, kernels
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arr = np.load(image, mmap_mode="r")
    if mode == "plain":
        x = normalise(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None], IMAGENET_MEAN, IMAGENET_STD)
        t0, w0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            logits = model(x)
    else:
        stream = xcit.streaming(model, IMAGENET_MEAN, IMAGENET_STD, tokens_per_chunk=chunk)
        t0, w0 = time.process_time(), time.perf_counter()
        logits = stream(arr)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    tokens = (-(-size // model.patch_size)) ** 2
    return {
        "mode": mode, "size": size, "tokens": tokens, "cpu_s": cpu, "wall_s": wall,
        "us_per_token": 1e6 * cpu / tokens, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_model_bytes": rss_model, "logits_head": [float(v) for v in logits[0, :3]],
    }


def _make_image(path: Path, size: int) -> None:
    import numpy as np

    if path.exists():
        return
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    rng = np.random.default_rng(size)
    for r in range(0, size, 1024):
        arr[r:r + 1024] = rng.integers(0, 256, size=arr[r:r + 1024].shape, dtype=np.uint8)
    arr.flush()
    del arr


def _machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        family, model = fields.get("CPU family", "?"), fields.get("Model", "?")
        info["cpu"] = f"{fields.get('Model name', '?')} (family {family}, model {model})"
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor() or "unknown"
    import torch

    info["torch"] = torch.__version__
    return info


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for mode, style in (("plain", "o-"), ("streaming", "s-")):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["size"])
        sizes = sorted({r["size"] for r in rows})
        if not sizes:
            continue
        peak = [max(r["peak_rss_bytes"] for r in rows if r["size"] == s) / 2**30 for s in sizes]
        tpt = [min(r["us_per_token"] for r in rows if r["size"] == s) for s in sizes]
        label = "plain model(x), float input" if mode == "plain" else "xcit.streaming, uint8 memmap input"
        ax1.plot(sizes, peak, style, label=label)
        ax2.plot(sizes, tpt, style, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("image side (pixels)")
        ax.grid(alpha=0.3)
    ax1.axhline(6e9 / 2**30, ls="--", color="grey", lw=1, label="6 GB target (16384^2)")
    ax1.set_yscale("log", base=2)
    ax1.set_ylabel("peak RSS (GiB)")
    ax1.set_title("memory")
    ax2.set_ylabel("CPU time per token (us), 1 thread")
    ax2.set_title("time")
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _targets(results: list[dict]) -> str:
    """The issue's targets, where the sizes they name were measured."""
    def best(mode, size, key="us_per_token", fn=min):
        vals = [r[key] for r in results if r["mode"] == mode and r["size"] == size]
        return fn(vals) if vals else None

    lines = ["| target | measured | goal | status |", "|---|---:|---:|---|"]
    peak = best("streaming", 16384, "peak_rss_bytes", max)
    if peak:
        lines.append(f"| 16384x16384 streaming peak RSS (uint8 input included) | {peak / 2**30:.2f} GiB | <= 6 GB "
                     f"| {'met' if peak <= 6e9 else 'missed'} |")
    s16, p2 = best("streaming", 16384), best("plain", 2048)
    if s16 and p2:
        lines.append(f"| time per token, streaming 16384^2 / plain 2048^2 | {s16 / p2:.2f}x | <= 1.3x "
                     f"| {'met' if s16 / p2 <= 1.3 else 'missed'} |")
    s4, p4 = best("streaming", 4096), best("plain", 4096)
    if s4 and p4:
        lines.append(f"| time, streaming / plain at 4096^2 | {s4 / p4:.2f}x | <= 1.3x | {'met' if s4 / p4 <= 1.3 else 'missed'} |")
    return "\n".join(lines)


def _table(results: list[dict]) -> str:
    sizes = sorted({r["size"] for r in results})
    lines = [
        "| image | tokens | plain peak RSS | streaming peak RSS | plain us/token | streaming us/token "
        "| streaming / plain time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sizes:
        def pick(mode, key, fn):
            vals = [r[key] for r in results if r["mode"] == mode and r["size"] == s]
            return fn(vals) if vals else None

        pp, sp = pick("plain", "peak_rss_bytes", max), pick("streaming", "peak_rss_bytes", max)
        pt, st = pick("plain", "us_per_token", min), pick("streaming", "us_per_token", min)
        fmt = lambda b: f"{b / 2**30:.2f} GiB" if b else "n/a"  # noqa: E731
        ratio = f"{st / pt:.2f}x" if pt and st else ""
        tokens = next(r["tokens"] for r in results if r["size"] == s)
        lines.append(f"| {s}x{s} | {tokens:,} | {fmt(pp)} | {fmt(sp)} | "
                     f"{f'{pt:.0f}' if pt else 'n/a'} | {f'{st:.0f}' if st else 'n/a'} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--plain-max", type=int, default=8192, help="largest side the plain forward is run at")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds at sides <= --repeat-max")
    p.add_argument("--repeat-max", type=int, default=4096)
    p.add_argument("--model", default="xcit_small_12_p16")
    p.add_argument("--tokens-per-chunk", type=int, default=16384)
    p.add_argument("--images", default="/tmp/xcit_streaming_bench", help="where the random uint8 images are written")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--report", default=None, metavar="JSON", help="only write the table and plot of a finished run")
    p.add_argument("--case", nargs=3, metavar=("MODE", "SIZE", "IMAGE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        print(json.dumps(_case(a.case[0], int(a.case[1]), a.case[2], a.model, a.tokens_per_chunk)))
        return 0
    out = Path(a.out)
    if a.report:
        _write_report(json.loads(Path(a.report).read_text()), out)
        return 0
    images = Path(a.images)
    images.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/streaming.py " + " ".join(sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: list[dict] = []
    for size in a.sizes:
        path = images / f"random_{size}.npy"
        _make_image(path, size)
        rounds = a.rounds if size <= a.repeat_max else 1
        modes = (["plain"] if size <= a.plain_max else []) + ["streaming"]
        for _ in range(rounds):
            for mode in modes:
                cmd = [sys.executable, __file__, "--model", a.model, "--tokens-per-chunk", str(a.tokens_per_chunk),
                       "--case", mode, str(size), str(path)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
                results.append(res)
                print(f"{mode:9s} {size:6d}: {res['cpu_s']:8.1f} s CPU, {res['us_per_token']:6.1f} us/token, "
                      f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
                report = {"model": a.model, "command": command, "started": started, "machine": _machine(),
                          "tokens_per_chunk": a.tokens_per_chunk, "results": results}
                (out / "streaming.json").write_text(json.dumps(report, indent=1))
    _write_report(report, out)
    return 0


def _write_report(report: dict, out: Path) -> None:
    results = report["results"]
    _plot(results, out / "streaming.png")
    m = report["machine"]
    text = "\n\n".join([
        f"Model `{report['model']}`, random weights, batch 1, tokens_per_chunk {report['tokens_per_chunk']}; "
        f"run {report['started']}; CPU {m['cpu']}, one pinned core, torch {m['torch']}, Python {m['python']}.",
        f"```\n{report['command']}\n```", _table(results), _targets(results),
    ])
    (out / "streaming.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
