"""bf16 autocast vs fp32: share of equal top-1 predictions of a trained model on the Fashion-MNIST test set.

    python benchmarks/bf16_agreement.py runs/<run>/model.pth [--json out.json]

The model is loaded as ``xcit eval`` loads it (preprocessing from the checkpoint), fused
(``model.fuse()``), and run on the 10,000 test images once in fp32 and once under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Target (issue 4): agreement >= 99.5%.
``xcit bench --bf16-checkpoint PATH`` runs the same check and puts it in RESULTS.md.
"""
import argparse
import json
import sys

from xcit.bench import bf16_agreement

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the result to this file")
    a = p.parse_args()
    res = bf16_agreement(a.checkpoint, data=a.data, batch_size=a.batch_size)
    print(f"{res['n']} images: top-1 equal in {res['agreement']:.2%} (fp32 top-1 {res['top1_fp32']:.2%}, "
          f"bf16 top-1 {res['top1_bf16']:.2%}); fp32 {res['time_fp32_s']:.1f} s, bf16 {res['time_bf16_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(0 if res["agreement"] >= 0.995 else 1)
