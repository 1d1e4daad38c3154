"""Which XCA layout the runtimes run fastest: our export (token-major q / k / v, (B, h, N, d), attn @ v as
one Einsum node: what `xcit export` writes), the same with attn @ v as a MatMul (what it wrote before), the
same model traced with XCA channel-major ((B, h, d, N), the official and timm's layout; both defined here, not
in the package) and timm's export, in OpenVINO / OpenVINO + NNCF
int8 / ONNX Runtime, interleaved in one process, one thread, process CPU time.

    taskset -c 0 .venv/bin/python benchmarks/xca_layout.py 224:int8 1024:fp32 --json benchmarks/xca_layout.json

Each argument is SIZE:PRECISION (224 runs batch 16, any other size batch 1; precisions fp32, bf16,
int8, with the calibration images of `xcit bench --preset roofline`). Prints, per runtime, each
export's median and the paired median of t(timm's export) / t(this export) (> 1: faster than timm's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from xcit import export as ex
from xcit.bench.contenders import build, calibration_set, export_timm_onnx, runtime_runners
from xcit.bench.timing import cpu_identity
from xcit.models import layers


def channel_major_forward(self, x: torch.Tensor) -> torch.Tensor:
    """XCA with q / k / v as (B, h, d, N): the same modules and values, the official layout."""
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
    gram = torch.matmul(q, k.transpose(-2, -1))
    attn = layers.attention_from_gram(gram, (q * q).sum(-1).sqrt(), (k * k).sum(-1).sqrt(), self.temperature)
    out = torch.matmul(self.attn_drop(attn).to(v.dtype), v).permute(0, 3, 1, 2)
    return self.proj_drop(self.proj(out.reshape(b, n, c)))


def matmul_forward(self, x: torch.Tensor) -> torch.Tensor:
    """XCA as the package computes it, with attn @ v exported as a MatMul on the transposed values."""
    b, n, c = x.shape
    q, k, v = self._qkv(x)
    attn = self.attn_drop(layers.channel_attention(q, k, self.temperature)).to(v.dtype)
    out = torch.matmul(v, attn.transpose(-2, -1))
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def exports(workdir: Path) -> dict[str, Path]:
    model = build("this", "xcit_small_12_p16").eval()
    paths = {"token-major (ours)": ex.export_onnx(model, workdir / "token_major.onnx", exporter="torchscript")}
    token_major = layers.XCA.forward
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
    for name, forward in (("token-major, MatMul", matmul_forward), ("channel-major", channel_major_forward)):
        layers.XCA.forward = forward
        try:
            with torch.no_grad():
                diff = (model(x) - reference).abs().max().item()
            assert diff < 1e-4, f"the {name} forward differs from the model by {diff}"
            paths[name] = ex.export_onnx(model, workdir / f"{name.replace(', ', '_').replace('-', '_')}.onnx",
                                         exporter="torchscript")
        finally:
            layers.XCA.forward = token_major
    paths["timm"] = export_timm_onnx(build("timm", "xcit_small_12_p16").eval(), workdir / "timm.onnx")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="SIZE:PRECISION, e.g. 224:int8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/xcit_xca_layout"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = exports(args.workdir)
    cpu = cpu_identity()["cpu"]
    results = {"cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    for case in args.cases:
        size, precision = case.split(":")
        size = int(size)
        batch = 16 if size == 224 else 1
        calibration, _ = calibration_set(32 if size == 224 else 2, size)
        x = torch.randn(batch, 3, size, size)
        for runtime in args.runtimes:
            runs = {}
            for name, path in paths.items():
                made, skipped = runtime_runners(path, precision, tuple(x.shape), 1, args.workdir, calibration=calibration,
                                                runtimes=(runtime,))
                if runtime not in made:
                    print(f"{size} {precision} {runtime}: left out ({skipped.get(runtime)})")
                    break
                runs[name] = made[runtime](x)
                runs[name]()
            else:
                times = {name: [] for name in runs}
                for r in range(args.rounds):
                    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                        start = time.process_time()
                        runs[name]()
                        times[name].append(time.process_time() - start)
                row = {"size": size, "batch": batch, "precision": precision, "runtime": runtime, "exports": {}}
                for name, ts in times.items():
                    row["exports"][name] = {"median_s": statistics.median(ts),
                                            "timm_over_this": statistics.median(t / s for t, s in zip(times["timm"], ts))}
                results["rows"].append(row)
                print(f"{size} b{batch} {precision} {runtime}: " + "  ".join(
                    f"{name} {v['median_s']:.3f} s ({v['timm_over_this']:.3f}x timm's)" for name, v in row["exports"].items()), flush=True)
    print(f"({cpu}, one thread, process CPU time, {args.rounds} interleaved rounds)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
