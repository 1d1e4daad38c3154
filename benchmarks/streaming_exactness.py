"""Exactness of ``xcit.streaming`` at sizes too slow for the test suite: 2048^2 and 4096^2, patch 16 and 8.

    taskset -c 1 python benchmarks/streaming_exactness.py

For each model and size, the largest absolute difference to the plain forward of the logits, of the
normalised tokens (``forward_features``) and of the last XCA block's output, with a chunk size that
divides the token count and one that does not. Weights are random and then perturbed (LayerScale,
temperature, BatchNorm statistics moved off their trivial init, as in the tests), so that no layer is
an identity. Target (issue 19): every difference <= 1e-4. Writes ``streaming_exactness.json`` and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import xcit
from xcit.bench.contenders import perturb


def check(name: str, size: int, chunks: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = perturb(xcit.create_model(name)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        tokens, hp, wp = model.embed(x)
        blocks = model.forward_blocks(tokens, hp, wp)
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    rows = []
    for chunk in chunks:
        stream = xcit.streaming(model, tokens_per_chunk=chunk)
        t0 = time.perf_counter()
        out = stream.run(x, features=True)
        got, _, _ = stream.forward_tokens(x)
        rows.append({
            "model": name, "size": size, "tokens": hp * wp, "tokens_per_chunk": chunk,
            "divides_tokens": (hp * wp) % chunk == 0,
            "logits": (out.logits - logits).abs().max().item(),
            "features": (out.features - feats).abs().max().item(),
            "last_block": (got - blocks).abs().max().item(),
            "seconds": time.perf_counter() - t0,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["xcit_nano_12_p16", "xcit_nano_12_p8"])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "streaming_exactness.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        for size in a.sizes:
            grid = -(-size // int(name.rsplit("_p", 1)[1]))
            rows += check(name, size, [grid * 8, 10007])  # 8 whole rows per tile; a prime
    Path(a.out).write_text(json.dumps({"command": "python benchmarks/streaming_exactness.py " + " ".join(sys.argv[1:]),
                                       "results": rows}, indent=1))
    print("| model | image | tokens | tokens_per_chunk | max abs diff: logits | features | last XCA block |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['size']}x{r['size']} | {r['tokens']:,} | {r['tokens_per_chunk']:,} | "
              f"{r['logits']:.1e} | {r['features']:.1e} | {r['last_block']:.1e} |")
    worst = max(max(r["logits"], r["features"], r["last_block"]) for r in rows)
    print(f"largest difference {worst:.2e} (target <= 1e-4): {'met' if worst <= 1e-4 else 'MISSED'}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
