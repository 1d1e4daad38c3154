"""Optimizer parameter groups for XCiT."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    exempt_per_channel: bool = False,
    no_decay: Iterable[str] = (),
    read_no_weight_decay: bool = True,
) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group.

    The default reproduces the official (DeiT) recipe: biases, 1-d parameters (norms, LayerScale
    gammas) and ``model.no_weight_decay()`` names are not decayed, but the (heads, 1, 1)
    ``temperature`` is. ``exempt_per_channel=True`` also exempts every parameter holding one value
    per channel or head (``temperature``, ``cls_token``); ``no_decay`` adds exact names.
    ``read_no_weight_decay=False`` ignores ``model.no_weight_decay()`` (DINO's rule: biases and
    1-d parameters only).
    """
    skip = set(no_decay)
    if read_no_weight_decay and hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        per_channel = sum(1 for s in param.shape if s > 1) <= 1
        if param.ndim <= 1 or name.endswith(".bias") or name in skip or (exempt_per_channel and per_channel):
            keep.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
