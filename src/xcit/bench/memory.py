"""Peak memory of one inference forward pass, measured in a fresh process (Linux ``VmHWM``).

``python -m xcit.bench.memory '{"impl": ..., "model": ..., "res": ..., "batch": ..., "threads": ...}'``
prints the measurement as JSON; :func:`run_memory_probe` starts that process and reads it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .contenders import build


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def memory_probe(spec: dict) -> dict:
    """In this (fresh) process: resident memory before, and peak during, one inference forward pass."""
    import gc

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = build(spec["impl"], spec["model"]).eval()
    x = torch.randn(spec["batch"], 3, spec["res"], spec["res"])
    gc.collect()
    before = _rss_kb("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    with torch.inference_mode():
        model(x)
    peak = _rss_kb("VmHWM")
    return {"before_mb": before / 1024, "peak_mb": peak / 1024, "delta_mb": (peak - before) / 1024, "hwm_reset": reset}


def run_memory_probe(impl: str, model_name: str, res: int, batch: int, threads: int | None) -> dict:
    spec = json.dumps({"impl": impl, "model": model_name, "res": res, "batch": batch, "threads": threads})
    cmd = [sys.executable, "-m", "xcit.bench.memory", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        oom = proc.returncode in (-9, 137) or "memory" in tail[0].lower()
        return {"error": ("out of memory: " if oom else "") + tail[0], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(memory_probe(json.loads(sys.argv[1]))))
