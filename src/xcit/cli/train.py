"""`xcit train`: every option of :class:`xcit.classify.TrainConfig`, from the command line or YAML files.

``xcit train`` alone trains the Fashion-MNIST preset; ``xcit train --data /imagenet`` the paper's
ImageNet recipe; ``torchrun --nproc_per_node=8 -m xcit train ...`` the same data-parallel.
"""
from __future__ import annotations

import argparse

from .options import add_training_command


def register(sub: argparse._SubParsersAction) -> None:
    from ..classify.config import PRESETS

    add_training_command(
        sub, "train", "xcit.classify",
        help="train or fine-tune an XCiT (Fashion-MNIST preset by default; ImageNet-style folders; torchrun)",
        description="Train an XCiT. The defaults shown are the paper's ImageNet recipe; a preset chosen by the "
                    f"dataset ({', '.join(PRESETS)}) replaces some of them (--print-config shows the result), --config "
                    "YAML files override the preset and the command line overrides them all. The resolved "
                    "configuration is saved in the run folder.")
