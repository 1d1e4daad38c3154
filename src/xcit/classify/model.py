"""Classification's model: the XCiT to train, its fine-tuning weights, and a distillation teacher."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..models import MODELS, XCiT, create_model, resolve_name
from ..models.weights import CheckpointError, download_release, load_file, read_state_dict
from .config import TrainConfig

_STEM = "patch_embed.proj.0.0.weight"


def arch_overrides(cfg: TrainConfig) -> dict:
    keys = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "tokens_norm")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}


def drop_path_rate(cfg: TrainConfig) -> float:
    """The configured rate, or the model's preset (0.05 for small_12, 0.1 for small_24, ...)."""
    return cfg.drop_path if cfg.drop_path is not None else MODELS[resolve_name(cfg.model).arch].drop_path_rate


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, finetune: bool = True) -> tuple[XCiT, str | None]:
    """The XCiT to train (weights from ``cfg.finetune`` when given and ``finetune``) and a note on what was
    loaded."""
    model = create_model(
        cfg.model, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate(cfg),
        drop_rate=cfg.dropout, **arch_overrides(cfg),
    )
    note = None
    if cfg.finetune and finetune:
        info = load_finetune_weights(model, cfg.finetune)
        note = f"fine-tuning from {info['path']}" + (f" ({'; '.join(info['notes'])})" if info["notes"] else "")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, note


def finetune_source(spec: str) -> Path:
    """A weights file: ``spec`` itself, or the release weights of the model name ``spec``."""
    path = Path(spec).expanduser()
    if path.exists() or os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors", ".bin")):
        if not path.is_file():
            raise CheckpointError(f"fine-tuning checkpoint {spec!r} does not exist")
        return path
    resolve_name(spec)  # ValueError for a name that is neither a file nor a model
    return download_release(spec)


def load_finetune_weights(model: XCiT, spec: str) -> dict:
    """Load every fitting tensor of ``spec`` into ``model`` for fine-tuning.

    The head is re-initialised when the class count differs; a 3-channel stem is summed over its
    input channels for a 1-channel model (and a 1-channel one spread over 3). Any other mismatch
    (different width or depth) is a :class:`CheckpointError` listing the keys.
    """
    path = finetune_source(spec)
    state = read_state_dict(path)
    own = model.state_dict()
    notes = []
    if _STEM in state and _STEM in own and state[_STEM].shape[1] != own[_STEM].shape[1]:
        w, c_in = state[_STEM], own[_STEM].shape[1]
        if c_in == 1:
            state[_STEM] = w.sum(dim=1, keepdim=True)
        elif w.shape[1] == 1:
            state[_STEM] = w.repeat(1, c_in, 1, 1) / c_in
        else:
            raise CheckpointError(f"{path}: stem takes {w.shape[1]} channels, the model {c_in}; cannot convert")
        notes.append(f"stem converted from {w.shape[1]} to {c_in} input channels")
    head = [k for k in ("head.weight", "head.bias") if k in state and k in own and state[k].shape != own[k].shape]
    if head:
        file_classes = state["head.weight"].shape[0] if "head.weight" in state else "?"
        for k in ("head.weight", "head.bias"):
            state.pop(k, None)
        notes.append(f"new {model.num_classes}-class head (the file's has {file_classes} classes)")
    missing = [k for k in own if k not in state and not (head and k.startswith("head."))]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not fit the model to fine-tune ({resolve_model_text(model)}):"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + "; ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        lines.append("  Set --model/--embed-dim/--depth/--num-heads/--patch-size to the checkpoint's architecture.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)
    return {"path": str(path), "notes": notes}


def resolve_model_text(model: XCiT) -> str:
    cfg = model.arch_config
    return ", ".join(f"{k}={cfg[k]}" for k in ("patch_size", "embed_dim", "depth", "num_heads", "in_chans", "num_classes"))


def build_teacher(cfg: TrainConfig, num_classes: int, in_chans: int, device: torch.device) -> nn.Module:
    """The frozen distillation teacher: an XCiT checkpoint, or a timm architecture with its weights."""
    path = Path(cfg.teacher).expanduser()
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {cfg.teacher!r} does not exist")
    name = cfg.teacher_model
    xcit_name = name is None
    if name is not None:
        try:
            resolve_name(name)
            xcit_name = True
        except ValueError:
            xcit_name = False
    if xcit_name:
        teacher = create_model(name, checkpoint=path, in_chans=in_chans)
    else:
        try:
            import timm
        except ImportError as err:
            raise ValueError(f"teacher model {name!r} is not an XCiT; it needs timm (pip install timm)") from err
        if name not in timm.list_models():
            raise ValueError(f"unknown teacher model {name!r}: neither an XCiT nor a timm architecture")
        teacher = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
        raw = load_file(path, what="teacher checkpoint")
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(raw, dict) and isinstance(raw.get(key), dict):
                raw = raw[key]
                break
        try:
            teacher.load_state_dict(raw)
        except RuntimeError as err:
            raise CheckpointError(f"teacher checkpoint {path} does not fit {name}: {err}") from err
    out = getattr(teacher, "num_classes", None)
    if out is not None and out != num_classes:
        raise ValueError(f"the teacher predicts {out} classes, the dataset has {num_classes}")
    teacher.eval().requires_grad_(False)
    return teacher.to(device)
