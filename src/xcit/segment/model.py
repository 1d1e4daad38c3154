"""Building segmenters: the XCiT backbone (named, custom or from a classification / DINO checkpoint),
the head, and saving / loading whole segmentation checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models import MODELS, XCiTPyramid, resolve_name
from ..models.weights import CheckpointError, infer_architecture, read_state_dict, to_official_layout
from .heads import Segmenter

TRUNK_PREFIXES = ("patch_embed.", "pos_embeder.", "blocks.")
_ARCH_KEYS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "eta", "use_pos_embed")
FORMAT = "xcit-segmenter-1"


def read_backbone_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The XCiT trunk weights in ``path``, official key layout.

    Accepts what :func:`xcit.models.weights.read_state_dict` reads: official release, timm, bare
    state dicts, safetensors, DINO checkpoints (backbone-only ``*_pretrain.pth``, and training
    checkpoints ``{'teacher': {'backbone.blocks...'}}`` whose teacher is used) and segmentation
    checkpoints written here (``backbone.`` prefix).
    """
    state = to_official_layout(read_state_dict(path))
    trunk = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIXES)}
    if not any(k.startswith("blocks.") for k in trunk):
        raise CheckpointError(f"{path}: no XCiT blocks found (expected keys like 'blocks.0.attn.qkv.weight')")
    return trunk


def build_backbone(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    out_indices: list[int] | None = None,
    drop_path_rate: float = 0.0,
    **arch_overrides,
) -> XCiTPyramid:
    """An :class:`XCiTPyramid`: named (``xcit_small_12_p16``), customised (``patch_size=8, embed_dim=96``)
    and/or initialised from the trunk of any XCiT classification or DINO ``checkpoint``.

    With a checkpoint the architecture is read from its shapes (``name`` may be omitted); every
    trunk weight must be present and fit, else :class:`CheckpointError` names the difference.
    ``checkpoint`` may also name released weights (``hf-hub:timm/...``, ``dino_xcit_small_12_p16``,
    ``xcit_small_12_p16_224.fb_in1k``; see :mod:`xcit.models.hub`).
    """
    from ..models.hub import weights_file

    arch: dict = {}
    state = None
    if checkpoint is not None:
        checkpoint = weights_file(checkpoint)  # a path, or a hub / DINO / release name
        state = read_backbone_state(checkpoint)
        found = infer_architecture(state)
        arch = {k: found[k] for k in _ARCH_KEYS if k in found}
    if name is not None:
        spec = MODELS[resolve_name(name).arch].kwargs()
        spec.pop("tokens_norm", None)
        if state is not None:
            clash = {k: (spec[k], arch[k]) for k in spec if k in arch and arch[k] != spec[k]}
            if clash:
                raise CheckpointError(
                    f"{checkpoint} does not hold {name}: " + ", ".join(f"{k} {a} (name) vs {b} (file)" for k, (a, b) in clash.items())
                )
        arch = {**spec, **arch}
    if not arch and not arch_overrides:
        raise ValueError("expected a backbone name, a checkpoint or an architecture (patch_size, embed_dim, ...), got none")
    arch.update({k: v for k, v in arch_overrides.items() if v is not None})
    backbone = XCiTPyramid(out_indices=out_indices, drop_path_rate=drop_path_rate, **arch)
    if state is not None:
        own = {k: v for k, v in backbone.state_dict().items() if k.startswith(TRUNK_PREFIXES)}
        missing = [k for k in own if k not in state]
        bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or bad:
            raise CheckpointError(
                f"{checkpoint} does not fit the backbone {arch}: "
                + (f"missing {len(missing)} keys ({', '.join(missing[:5])}); " if missing else "")
                + (f"mismatched: {'; '.join(bad[:5])}" if bad else "")
            )
        backbone.load_state_dict({k: state[k] for k in own}, strict=False)
    backbone.model_name = name and resolve_name(name).arch
    return backbone


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
    """Backbone (see :func:`build_backbone`) + head (``"fpn"`` or ``"upernet"``) for ``num_classes``."""
    pyramid = build_backbone(backbone, pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate, **(arch or {}))
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
    an official ADE20k release file (mmseg 0.11 layout; a path or a name such as ``upernet_xcit_tiny_12_p16``)."""
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
        return load_mmseg_segmenter(path, other)
    model = segmenter_from_config(raw["config"])
    model.load_state_dict(raw["model"])
    return model.eval(), raw.get("meta", {})
