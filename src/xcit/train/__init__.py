"""The run engine every training task plugs into: :func:`fit` (the one training loop), the task protocol
(:class:`Task`), the run folder (:class:`Run`), the optimiser step and the shared options.

The tasks live in their own packages: :mod:`xcit.classify` (``xcit train``), :mod:`xcit.dino`,
:mod:`xcit.detect` and :mod:`xcit.segment`.
"""
from .checkpoint import load_state, save_state
from .options import OptimOptions, PyramidOptions, RunOptions, load_config_file
from .loop import fit
from .plots import plot_run
from .run import NonFiniteLossError, OptimStep, Run, RunFolderError
from .task import Batch, FitResult, Task, TrainData

__all__ = [
    "Batch", "FitResult", "NonFiniteLossError", "OptimOptions", "OptimStep", "PyramidOptions", "Run", "RunFolderError",
    "RunOptions", "Task", "TrainData", "fit", "load_config_file", "load_state", "plot_run", "save_state",
]
