"""Interleaved timing (medians and paired ratios), the machine's description and its matmul peaks."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Timing:
    label: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Run the contenders in turn, ``warmup`` untimed rounds then ``repeats`` timed rounds, timed by ``clock``."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    out = {k: Timing(k) for k in contenders}
    for _ in range(repeats):
        for k, fn in contenders.items():
            t0 = clock()
            fn()
            out[k].times.append(clock() - t0)
    return out


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over rounds of num / den (how many times faster ``den`` is than ``num``)."""
    return statistics.median(a / b for a, b in zip(num.times, den.times))




def cpu_identity() -> dict:
    """This machine's CPU as benchmarks record it: the model name, vendor / family / model numbers (which tell
    the project's machine kinds apart) and the matrix-engine flags that decide bf16 and int8 speed."""
    info: dict = {}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "vendor_id") and key not in info:
                info[key] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": info.get("model name", platform.processor() or "unknown CPU"),
            "cpu_id": f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}",
            "cpu_flags": [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
                          if f in flags]}


def code_version() -> str:
    """This package's version and, when it runs from a git checkout, the commit (``+changes`` if the work tree
    differs from it): which code a results file measured."""
    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    if package.parent.name != "src":  # an installed copy, not a checkout's src/xcit
        return __version__
    root = package.parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {commit}{' +changes' if changed else ''})" if commit else __version__


def machine_info() -> dict:
    import torch

    info = {"xcit": code_version(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    cpuinfo = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpuinfo = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        pass
    info["cpu"] = cpuinfo.get("Model name", platform.processor() or "unknown")
    identity = cpu_identity()
    info["cpu_id"], info["cpu_flags"] = identity["cpu_id"], identity["cpu_flags"]
    flags = set(cpuinfo.get("Flags", "").split())
    info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
                               "avx_vnni") if f in flags]
    info["caches"] = {k: cpuinfo[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in cpuinfo}
    try:
        mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    config = torch.__config__.show()
    info["blas"] = "MKL" if "USE_MKL=ON" in config or "mkl" in config.lower() else "other"
    info["onednn"] = bool(torch.backends.mkldnn.is_available())
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["load_start"] = os.getloadavg()
    return info


def measure_peaks(repeats: int = 5, sizes: tuple[int, ...] = (2048, 4096),
                  clock: Callable[[], float] = time.perf_counter, int8: bool = True) -> dict:
    """Matmul GFLOP/s, median of ``repeats``: fp32 via torch.mm (BLAS) and via oneDNN, bf16 via torch.mm and,
    with ``int8``, int8 x int8 -> int32 via ``torch._int_mm`` (GOP/s, multiply and add counted as in float).

    The int8 peak is left out (``int8_error`` says why) where ``torch._int_mm`` does not run on the CPU."""
    import torch

    res: dict[str, float] = {}
    out: dict = {}
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n)
            b = torch.randn(n, n)
            ab, bb = a.bfloat16(), b.bfloat16()
            contenders = {"fp32_blas": lambda: torch.mm(a, b), "bf16": lambda: torch.mm(ab, bb)}
            if torch.backends.mkldnn.is_available():
                contenders["fp32_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
            if int8:
                gen = torch.Generator().manual_seed(0)
                a8 = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
                b8 = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
                try:
                    torch._int_mm(a8[:16, :16], b8[:16, :16])
                    contenders["int8"] = lambda: torch._int_mm(a8, b8)
                except (RuntimeError, NotImplementedError) as err:
                    out["int8_error"] = f"torch._int_mm does not run here: {type(err).__name__}: {str(err)[:200]}"
            times = interleaved(contenders, repeats, warmup=1, clock=clock)
            for k, t in times.items():
                res[f"{k}_{n}"] = 2 * n**3 / t.median / 1e9
    peak = {k: max(v for kk, v in res.items() if kk.startswith(k + "_")) for k in ("fp32_blas", "fp32_onednn", "bf16", "int8")
            if any(kk.startswith(k + "_") for kk in res)}
    peak["fp32"] = max(peak.get("fp32_blas", 0.0), peak.get("fp32_onednn", 0.0))
    return {"gflops": peak, "by_size": res, "sizes": list(sizes), **out}
