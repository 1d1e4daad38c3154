"""The official ADE20k checkpoints (mmsegmentation 0.11: Semantic FPN 80k, UperNet 160k) as :class:`Segmenter`.

The released files (``{sem_fpn,upernet}_xcit_{tiny_12,small_12,small_24,medium_24}_p{16,8}.pth``) hold
``{'meta': ..., 'state_dict': ...}`` in mmseg's module names; ``reference/layouts/mmseg_ade20k.json``
lists every key and shape (derived from the official configs by ``scripts/derive_layouts.py``).
The heads here compute what mmseg's do with those configs (FPN neck + FPNHead with 128 channels,
neck width = backbone width; UPerHead with 512 channels + FCN auxiliary head on level 2, 256
channels; SyncBN -> BatchNorm at test time). Names map one to one:

=========================================  =========================================
mmseg 0.11                                 here
=========================================  =========================================
``neck.lateral_convs.i.conv``              ``decode_head.neck.lateral.i``
``neck.fpn_convs.i.conv``                  ``decode_head.neck.output.i``
``decode_head.scale_heads.i.2k.{conv,bn}``  ``decode_head.scale_heads.i.k.{0,1}`` (mmseg interleaves Upsample)
``decode_head.psp_modules.j.1.{conv,bn}``  ``decode_head.ppm.branches.j.1.{0,1}``
``decode_head.bottleneck / lateral_convs /  ``decode_head.bottleneck / lateral / fpn / fuse``
fpn_convs / fpn_bottleneck``
``decode_head.conv_seg``                   ``decode_head.classifier``
``auxiliary_head.convs.0`` / ``conv_seg``  ``aux_head.conv`` / ``aux_head.classifier``
=========================================  =========================================

Test pipeline of the configs (kept in the returned meta, used by ``xcit segment eval / predict``):
keep-ratio resize into 2048 x 512 (sizes ``int(x * s + 0.5)``), whole-image inference (``test_cfg
mode='whole'`` in all sixteen configs; no sliding window), logits resized bilinearly to the image.
FPNHead's exact-2x upsampling is reproduced (``fpn_upsample="x2"``; it differs from resizing to the
next level's size when a level's size is odd). Known remaining differences: mmseg resized uint8
images with cv2 (no antialiasing; here antialiased when shrinking), and applied the softmax after
resizing logits to the image size (here probabilities are resized; the argmax can differ at edges).
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from ..models import XCiTPyramid
from ..models.weights import CheckpointError, check_layout, infer_architecture, load_file
from .ade20k import ADE20K_CLASSES
from .heads import Segmenter

_RULES = [
    (r"^backbone\.", lambda m: "backbone."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", lambda m: f"decode_head.neck.lateral.{m[1]}."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", lambda m: f"decode_head.neck.output.{m[1]}."),
    (r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.(conv|bn)\.", lambda m: f"decode_head.scale_heads.{m[1]}.{int(m[2]) // 2}.{_IDX[m[3]]}."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.(conv|bn)\.", lambda m: f"decode_head.ppm.branches.{m[1]}.1.{_IDX[m[2]]}."),
    (r"^decode_head\.bottleneck\.(conv|bn)\.", lambda m: f"decode_head.bottleneck.{_IDX[m[1]]}."),
    (r"^decode_head\.lateral_convs\.(\d+)\.(conv|bn)\.", lambda m: f"decode_head.lateral.{m[1]}.{_IDX[m[2]]}."),
    (r"^decode_head\.fpn_convs\.(\d+)\.(conv|bn)\.", lambda m: f"decode_head.fpn.{m[1]}.{_IDX[m[2]]}."),
    (r"^decode_head\.fpn_bottleneck\.(conv|bn)\.", lambda m: f"decode_head.fuse.{_IDX[m[1]]}."),
    (r"^decode_head\.conv_seg\.", lambda m: "decode_head.classifier."),
    (r"^auxiliary_head\.convs\.0\.(conv|bn)\.", lambda m: f"aux_head.conv.{_IDX[m[1]]}."),
    (r"^auxiliary_head\.conv_seg\.", lambda m: "aux_head.classifier."),
]
_IDX = {"conv": 0, "bn": 1}
ADE20K_EVAL = {"mode": "whole", "scale": [2048, 512]}


def mmseg_to_segmenter(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(this project's names, keys no rule accounts for) of an mmseg 0.11 EncoderDecoder state dict."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in _RULES:
            m = re.match(pattern, key)
            if m:
                out[repl(m) + key[m.end():]] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def is_mmseg_checkpoint(raw: Any) -> bool:
    """Whether a loaded file is an mmseg segmenter (``state_dict`` with ``decode_head.`` keys)."""
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    return isinstance(state, dict) and any(str(k).startswith("decode_head.") for k in state)


def _head_from_shapes(state: dict[str, torch.Tensor]) -> dict:
    """Segmenter head arguments read off the mmseg shapes (Semantic FPN or UperNet, widths, auxiliary head)."""
    num_classes, channels = state["decode_head.conv_seg.weight"].shape[:2]
    if "neck.lateral_convs.0.conv.weight" in state:
        kw = dict(head="fpn", channels=channels, fpn_channels=state["neck.lateral_convs.0.conv.weight"].shape[0], aux=False,
                  fpn_upsample="x2")
    elif "decode_head.psp_modules.0.1.conv.weight" in state:
        kw = dict(head="upernet", channels=channels, aux=False)
    else:
        raise CheckpointError("expected a Semantic FPN ('neck.lateral_convs.*') or UperNet ('decode_head.psp_modules.*') head")
    if "auxiliary_head.conv_seg.weight" in state:
        kw.update(aux=True, aux_channels=state["auxiliary_head.conv_seg.weight"].shape[1], aux_level=2)
    return dict(num_classes=int(num_classes), **{k: int(v) if not isinstance(v, (bool, str)) else v for k, v in kw.items()})


def load_mmseg_segmenter(path: str | os.PathLike, raw: dict | None = None) -> tuple[Segmenter, dict]:
    """(Segmenter in eval mode, meta with ADE20k classes and the configs' test settings) from an official
    ADE20k release file. Architecture and head are read from the shapes; every key must be accounted for.

    Raises:
        CheckpointError: not an mmseg file, or one of another configuration (keys or shapes differ).
    """
    raw = load_file(path) if raw is None else raw
    if not is_mmseg_checkpoint(raw):
        raise CheckpointError(f"{path}: not an mmsegmentation checkpoint (expected 'state_dict' with 'decode_head.*' keys)")
    state = raw["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    arch = infer_architecture(backbone)
    if "depth" not in arch or "patch_size" not in arch or "decode_head.conv_seg.weight" not in state:
        raise CheckpointError(f"{path}: expected an XCiT backbone ('backbone.blocks.*') and 'decode_head.conv_seg.weight'")
    try:
        head = _head_from_shapes(state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    shape = {k: arch[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    pyramid = XCiTPyramid(**shape)
    pyramid.model_name = arch.get("name")
    model = Segmenter(pyramid, head.pop("num_classes"), **head)
    converted, unknown = mmseg_to_segmenter(state)
    header = (f"{path} is not a checkpoint of the official XCiT ADE20k configs (mmseg 0.11 layout; backbone "
              f"{arch.get('name', shape)}, head {model.head_config['head']}):")
    check_layout(model.state_dict(), converted, unknown, header)
    model.load_state_dict(converted, strict=True)
    meta_in = dict(raw.get("meta") or {})
    n = model.num_classes
    classes = list(meta_in.get("CLASSES") or (ADE20K_CLASSES if n == 150 else [f"class{i}" for i in range(n)]))
    meta = {"classes": [c.strip() for c in classes], "ignore_index": 255, "reduce_zero_label": n == 150,
            "eval": dict(ADE20K_EVAL), "source": os.fspath(path), "format": "mmseg-0.11"}
    if meta_in.get("PALETTE"):
        meta["palette"] = [list(map(int, c)) for c in meta_in["PALETTE"]]
    return model.eval(), meta
