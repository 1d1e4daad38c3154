"""Training and evaluation of XCiT: the paper's recipe on one process or many (``torchrun``).

``train(config)`` runs a whole training (data, model, optimizer, checkpoints, logs, plot) and
returns a :class:`RunResult`; ``evaluate(checkpoint, data)`` measures a saved model.
"""
from .checkpoint import load_state, save_state
from .config import PRESETS, RunOptions, TrainConfig, load_config_file, resolve_config, validate
from .engine import RunResult, evaluate, evaluate_model, read_model_metadata, train
from .plots import plot_run
from .run import NonFiniteLossError, OptimStep, Run, RunFolderError

__all__ = [
    "PRESETS", "NonFiniteLossError", "OptimStep", "Run", "RunFolderError", "RunOptions", "RunResult", "TrainConfig", "evaluate", "evaluate_model", "load_config_file",
    "load_state", "plot_run", "read_model_metadata", "resolve_config", "save_state", "train", "validate",
]
