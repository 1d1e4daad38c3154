"""Parameter and multiply-accumulate counts, measured with torch's flop counter."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: tuple[int, int] = (224, 224), batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2 as counted by torch), per image.

    Counts the matrix products and convolutions (what the paper reports as "FLOPs") of the
    reference computation (the plain model, not an optimised one: folding changes which products
    run); runs on the meta device when the model is there, so even the large models cost no compute.
    """
    param = next(model.parameters())
    x = torch.empty(batch, model.in_chans, *img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch
