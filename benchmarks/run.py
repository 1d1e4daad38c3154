"""One command for the whole benchmark suite: ``python benchmarks/run.py`` (same as ``xcit bench``).

Writes benchmarks/RESULTS.md, benchmarks/scaling.png and benchmarks/results.json. Options are those
of ``xcit bench --help`` (e.g. ``--preset quick`` for a short run, ``--bf16-checkpoint runs/.../model.pth``).
"""
import os
import sys

from xcit.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    os.environ.setdefault("XCIT_BENCH_COMMAND", "python benchmarks/run.py " + " ".join(args))
    sys.exit(main(["bench", *args]))
