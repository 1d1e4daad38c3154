"""One command for the whole benchmark suite: ``python benchmarks/run.py`` (the same as ``xcit bench``).

Writes benchmarks/RESULTS.md, benchmarks/scaling.png and benchmarks/results.json. Options are those
of ``xcit bench --help`` (e.g. ``--preset quick`` for a short run, ``--bf16-checkpoint runs/.../model.pth``).
It runs the installed ``xcit bench`` command; from Python, call :func:`xcit.bench.run_suite`.
"""
import os
import subprocess
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    env = {**os.environ}
    env.setdefault("XCIT_BENCH_COMMAND", "python benchmarks/run.py " + " ".join(args))
    sys.exit(subprocess.call([sys.executable, "-m", "xcit", "bench", *args], env=env))
