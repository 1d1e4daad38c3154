"""Supervised classification (``xcit train``, ``xcit eval``): the paper's ImageNet recipe on the one training loop.

``train(config)`` runs a whole training (data, model, optimiser, checkpoints, logs, plot) and returns a
:class:`~xcit.train.FitResult`; ``evaluate(checkpoint, data)`` measures a saved model.
"""
from .config import OPTIONS, PRESETS, TrainConfig, resolve_config, validate
from .evaluate import evaluate, evaluate_model, read_model_metadata
from .task import Classification, train

__all__ = ["OPTIONS", "PRESETS", "Classification", "TrainConfig", "evaluate", "evaluate_model", "read_model_metadata",
           "resolve_config", "train", "validate"]
