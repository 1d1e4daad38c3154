"""Building segmenters: the XCiT pyramid (:func:`xcit.models.create_pyramid`: named, custom or from a
classification / DINO checkpoint) with a head, and saving / loading whole segmentation checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models import XCiTPyramid, create_pyramid
from ..models.weights import CheckpointError, check_finite
from .heads import Segmenter

FORMAT = "xcit-segmenter-1"


def build_segmenter(
    num_classes: int,
    backbone: str | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    head: str = "upernet",
    out_indices: list[int] | None = None,
    drop_path_rate: float = 0.0,
    arch: dict | None = None,
    **head_kwargs,
) -> Segmenter:
    """Backbone (:func:`xcit.models.create_pyramid`) + head (``"fpn"`` or ``"upernet"``) for ``num_classes``."""
    pyramid = create_pyramid(backbone, pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate, **(arch or {}))
    return Segmenter(pyramid, num_classes, head=head, **head_kwargs)


def segmenter_config(model: Segmenter) -> dict:
    """Everything needed to rebuild ``model`` (without weights)."""
    bb = model.backbone
    return dict(
        num_classes=model.num_classes, arch=dict(bb.arch_config), out_indices=list(bb.out_indices),
        backbone_name=getattr(bb, "model_name", None), **model.head_config,
    )


def segmenter_from_config(cfg: dict) -> Segmenter:
    cfg = dict(cfg)
    pyramid = XCiTPyramid(out_indices=cfg.pop("out_indices"), **cfg.pop("arch"))
    pyramid.model_name = cfg.pop("backbone_name", None)
    num_classes = cfg.pop("num_classes")
    return Segmenter(pyramid, num_classes, **cfg)


def save_segmenter(model: Segmenter, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``{'format', 'config', 'model', 'meta'}`` atomically (temporary file + rename)."""
    from ..train.checkpoint import save_state

    model = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_state(Path(path), {"format": FORMAT, "config": segmenter_config(model), "model": state, "meta": meta or {}})


def load_segmenter(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """(model in eval mode, meta) from a checkpoint written by :func:`save_segmenter` or by training, or from
    an official ADE20k release file (mmseg 0.11 layout; a path or a name such as ``upernet_xcit_tiny_12_p16``).
    Weights holding NaN or infinity are a :class:`CheckpointError` naming the first such tensor."""
    from ..models.hub import dense_release_arch, weights_file
    from ..train.checkpoint import read_task_checkpoint

    if dense_release_arch(os.fspath(path)) is not None and not os.path.isfile(path):
        path = weights_file(path)
    try:
        raw = read_task_checkpoint(path, FORMAT, "segment", map_location)
    except CheckpointError:
        from ..models.weights import load_file
        from .mmseg_compat import is_mmseg_checkpoint, load_mmseg_segmenter

        other = load_file(path)
        if not is_mmseg_checkpoint(other):
            raise
        model, meta = load_mmseg_segmenter(path, other)
        check_finite(model.state_dict(), path)
        return model, meta
    check_finite(raw["model"], path)
    model = segmenter_from_config(raw["config"])
    model.load_state_dict(raw["model"])
    return model.eval(), raw.get("meta", {})


def normalization(meta: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a segmentation checkpoint's images are normalised with: its ``data`` entry, else (files
    written before it was recorded, the official ADE20k files) the ImageNet statistics every recipe here uses."""
    from ..data.images import IMAGENET_MEAN, IMAGENET_STD

    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    return tuple(data.get("mean") or IMAGENET_MEAN), tuple(data.get("std") or IMAGENET_STD)
