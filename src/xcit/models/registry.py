"""The model factories: a named (or checkpoint-shaped) XCiT classifier, and its dense pyramid backbone.

The catalogue of names lives in :mod:`xcit.models.names`; reading weights in :mod:`xcit.models.weights`."""
from __future__ import annotations

import os
from pathlib import Path

from .hub import DINO_MODELS, HF_PREFIX, resolve_pretrained, weights_file
from .names import MODELS, WEIGHT_TAGS, ModelSpec, ResolvedName, list_models, release_url, resolve_name
from .weights import (
    TRUNK_PREFIXES, CheckpointError, download_release, inspect_checkpoint, load_checkpoint, read_metadata, read_trunk,
)
from .xcit import XCiT, XCiTPyramid

__all__ = [
    "MODELS", "WEIGHT_TAGS", "ModelSpec", "ResolvedName", "create_model", "create_pyramid", "list_models",
    "named_resolution", "release_url", "resolve_name",
]


def create_model(
    name: str | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    **overrides,
) -> XCiT:
    """Build a named XCiT classifier, optionally loading weights.

    Args:
        name: official (``xcit_small_12_p16``) or timm (``xcit_small_12_p16_224.fb_in1k``) name, a
            Hugging Face Hub repository (``hf-hub:timm/xcit_nano_12_p16_224.fb_in1k``) or a DINO backbone
            (``dino_xcit_small_12_p16``, no head). May be omitted when ``checkpoint`` is given: the
            architecture is read from its shapes.
        num_classes: head size; default 1000, or the checkpoint's head size when loading one.
        in_chans: input channels (1 for grey images).
        drop_path_rate: stochastic depth, the same in every XCA block (official recipe).
        checkpoint: weights file (official release, timm, bare state dict or ``.safetensors``).
        pretrained: the release weights ``name`` refers to: downloaded once into the torch hub cache
            (official and DINO files) or through the ``huggingface_hub`` client and its cache (``hf-hub:``).
        overrides: any other :class:`XCiT` argument (``patch_size=4``, ``eta``, ...).
    """
    if isinstance(name, str) and name in DINO_MODELS and num_classes is None:
        num_classes = 0  # DINO backbones have no classifier
    named_sizes = [named_resolution(spec) for spec in (checkpoint, name)
                   if isinstance(spec, str) and not Path(spec).is_file()]
    name, checkpoint = _name_and_weights(name, checkpoint, pretrained)
    file_arch: dict = {}
    if checkpoint is not None:
        file_arch = inspect_checkpoint(checkpoint)
    if name is None:
        if not file_arch:
            raise ValueError("create_model needs a model name or a checkpoint to read the architecture from")
        keys = ("patch_size", "embed_dim", "depth", "num_heads", "tokens_norm", "mlp_ratio", "qkv_bias", "eta", "use_pos_embed", "cls_attn_layers")
        arch = {k: file_arch[k] for k in keys if k in file_arch}
        in_chans = file_arch.get("in_chans", in_chans)
    else:
        arch = MODELS[resolve_name(name).arch].kwargs()
    if num_classes is None:
        num_classes = file_arch.get("num_classes", 1000)
    kwargs = {**arch, "num_classes": num_classes, "in_chans": in_chans, "drop_path_rate": drop_path_rate, **overrides}
    model = XCiT(**kwargs)
    model.model_name = resolve_name(name).arch if name else file_arch.get("name")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    # the preprocessing the weights expect: the checkpoint's ``data`` entry, over the resolution a name stands for
    recorded = {"img_size": next((s for s in named_sizes if s is not None), None)}
    saved = read_metadata(checkpoint).get("data") if checkpoint is not None else None
    recorded = {k: v for k, v in {**recorded, **(saved if isinstance(saved, dict) else {})}.items() if v is not None}
    model.data_config = recorded or None
    return model


def named_resolution(name: str) -> int | None:
    """The input size a model or weights name stands for (``xcit_small_12_p16_384.fb_dist_in1k``: 384, official
    names: 224; ``hf-hub:timm/...`` and ``dino_...`` names too), None for anything else (a path)."""
    arch = name.rsplit("/", 1)[-1] if name.startswith(HF_PREFIX) else name
    arch = arch[len("dino_"):] if arch in DINO_MODELS else arch
    try:
        return resolve_name(arch).img_size
    except ValueError:
        return None


# trunk options a pyramid takes from a checkpoint (the others, such as the head's, do not apply to it)
_TRUNK_ARCH = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "eta", "use_pos_embed")
_NOT_TRUNK = ("num_classes", "tokens_norm", "cls_attn_layers")


def create_pyramid(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    out_indices: list[int] | None = None,
    drop_path_rate: float = 0.0,
    *,
    pretrained: bool = False,
    **arch_overrides,
) -> XCiTPyramid:
    """The 4-level dense backbone (strides 4/8/16/32) of an XCiT: named, customised and/or initialised
    from the trunk of any classification or DINO checkpoint.

    Args:
        name: an architecture name as for :func:`create_model` (official, timm, ``hf-hub:...``,
            ``dino_...``). May be omitted when ``checkpoint`` or ``arch_overrides`` give the shape.
        checkpoint: weights file or released-weights name (:func:`xcit.models.hub.weights_file`). Its trunk
            (patch embedding, positional encoding, XCA blocks) is loaded; a classifier head, class-attention
            blocks or a DINO head in it are ignored. The architecture is read from the file; every trunk
            weight must be present and fit, else :class:`CheckpointError` names the difference (also when
            ``name`` names another architecture).
        out_indices: the 4 XCA blocks whose outputs form the pyramid (default: the official ones).
        drop_path_rate: stochastic depth of the trunk.
        pretrained: the release weights ``name`` refers to, as for :func:`create_model`.
        arch_overrides: trunk options (``patch_size=8``, ``embed_dim=96``, ``depth=4``, ``in_chans=1``...);
            ``None`` values are ignored; classifier-only options (``num_classes``, ``tokens_norm``) are ignored.
    """
    name, checkpoint = _name_and_weights(name, checkpoint, pretrained)
    arch: dict = {}
    state = None
    if checkpoint is not None:
        state, found = read_trunk(checkpoint)
        arch = {k: found[k] for k in _TRUNK_ARCH if k in found}
    if name is not None:
        spec = {k: v for k, v in MODELS[resolve_name(name).arch].kwargs().items() if k not in _NOT_TRUNK}
        clash = {k: (spec[k], arch[k]) for k in spec if k in arch and arch[k] != spec[k]}
        if clash:
            raise CheckpointError(
                f"{checkpoint} does not hold {name}: " + ", ".join(f"{k} {a} (name) vs {b} (file)" for k, (a, b) in clash.items())
            )
        arch = {**spec, **arch}
    overrides = {k: v for k, v in arch_overrides.items() if v is not None and k not in _NOT_TRUNK}
    if not arch and not overrides:
        raise ValueError("expected a model name, a checkpoint or an architecture (patch_size, embed_dim, ...), got none")
    arch.update(overrides)
    pyramid = XCiTPyramid(out_indices=out_indices, drop_path_rate=drop_path_rate, **arch)
    if state is not None:
        own = {k: v for k, v in pyramid.state_dict().items() if k.startswith(TRUNK_PREFIXES)}
        missing = [k for k in own if k not in state]
        bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
               if k in state and state[k].shape != v.shape]
        if missing or bad:
            raise CheckpointError(
                f"{checkpoint} does not fit the backbone {arch}: "
                + (f"missing {len(missing)} keys ({', '.join(missing[:5])}); " if missing else "")
                + (f"mismatched: {'; '.join(bad[:5])}" if bad else "")
            )
        pyramid.load_state_dict({k: state[k] for k in own}, strict=False)
    pyramid.model_name = resolve_name(name).arch if name else None
    return pyramid


def _name_and_weights(
    name: str | None, checkpoint: str | os.PathLike | None, pretrained: bool
) -> tuple[str | None, Path | None]:
    """(architecture name, local weights file or None) for the factories' ``name`` / ``checkpoint`` / ``pretrained``.

    Hub and DINO names become the architecture they hold; ``pretrained`` fetches the weights ``name``
    refers to, ``checkpoint`` may be a path or a released-weights name.
    """
    if checkpoint is not None and pretrained:
        raise ValueError("give either checkpoint= or pretrained=True, not both")
    if isinstance(name, str) and (name.startswith(HF_PREFIX) or name in DINO_MODELS):
        if pretrained:
            name, checkpoint = resolve_pretrained(name)
            pretrained = False
        else:
            name = name.rsplit("/", 1)[-1] if name.startswith(HF_PREFIX) else name[len("dino_"):]
    if checkpoint is not None:
        return name, weights_file(checkpoint)  # a path, or a hub / DINO / release name
    if pretrained:
        if name is None:
            raise ValueError("pretrained=True needs a model name")
        return name, download_release(name)
    return name, None
