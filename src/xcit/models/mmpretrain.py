"""mmpretrain's XCiT classifiers (``download.openmmlab.com/mmclassification/v0/xcit/*.pth``) in the official layout.

mmpretrain converted the official release files into its own module tree
(``mmpretrain/models/backbones/xcit.py``, ``ImageClassifier`` + ``LinearClsHead``); the weights are
the same tensors under other names. ``reference/layouts/mmpretrain_xcit.json`` lists every key
(derived by ``scripts/derive_layouts.py``). The renames, each from an mmcv building block:

- ``ConvModule`` keeps its conv as ``.conv`` and its norm as ``.bn``; the stem is one Sequential of
  ConvModules (conv, BN and GELU in one entry) where the official one alternates conv3x3 / GELU,
  so stem entry ``i`` is official entry ``2i``; LPI's conv1 ConvModule holds the official ``local_mp.bn``;
- mmcv's ``FFN`` is ``layers.0.0`` (fc1 in a Sequential with the activation) and ``layers.1`` (fc2);
- ``xca_layers`` / ``ca_layers`` are ``blocks`` / ``cls_attn_blocks``; ``head.fc`` is ``head``;
  class attention's separate q / k / v are fused afterwards like timm's.
"""
from __future__ import annotations

import re

import torch

MMPRETRAIN_MARK = "backbone.xca_layers."
_RULES = [
    (re.compile(r"^backbone\.patch_embed\.proj\.(\d+)\.conv\.(.+)$"), lambda m: f"patch_embed.proj.{2 * int(m[1])}.0.{m[2]}"),
    (re.compile(r"^backbone\.patch_embed\.proj\.(\d+)\.bn\.(.+)$"), lambda m: f"patch_embed.proj.{2 * int(m[1])}.1.{m[2]}"),
    (re.compile(r"^backbone\.pos_embed\.token_projection\.conv\.(.+)$"), lambda m: f"pos_embeder.token_projection.{m[1]}"),
    (re.compile(r"^backbone\.(cls_token)$"), lambda m: m[1]),
    (re.compile(r"^backbone\.xca_layers\.(\d+)\.local_mp\.conv1\.conv\.(.+)$"), lambda m: f"blocks.{m[1]}.local_mp.conv1.{m[2]}"),
    (re.compile(r"^backbone\.xca_layers\.(\d+)\.local_mp\.conv1\.bn\.(.+)$"), lambda m: f"blocks.{m[1]}.local_mp.bn.{m[2]}"),
    (re.compile(r"^backbone\.xca_layers\.(\d+)\.local_mp\.conv2\.conv\.(.+)$"), lambda m: f"blocks.{m[1]}.local_mp.conv2.{m[2]}"),
    (re.compile(r"^backbone\.(xca|ca)_layers\.(\d+)\.ffn\.layers\.0\.0\.(.+)$"), lambda m: f"{_BLOCKS[m[1]]}.{m[2]}.mlp.fc1.{m[3]}"),
    (re.compile(r"^backbone\.(xca|ca)_layers\.(\d+)\.ffn\.layers\.1\.(.+)$"), lambda m: f"{_BLOCKS[m[1]]}.{m[2]}.mlp.fc2.{m[3]}"),
    (re.compile(r"^backbone\.(xca|ca)_layers\.(\d+)\.((?:norm\d|attn|gamma\d)\b.*)$"), lambda m: f"{_BLOCKS[m[1]]}.{m[2]}.{m[3]}"),
    (re.compile(r"^backbone\.norm\.(.+)$"), lambda m: f"norm.{m[1]}"),
    (re.compile(r"^head\.fc\.(.+)$"), lambda m: f"head.{m[1]}"),
]
_BLOCKS = {"xca": "blocks", "ca": "cls_attn_blocks"}


def from_mmpretrain(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(official-layout names for an mmpretrain XCiT classifier's state dict, q / k / v still separate;
    the keys no rule accounts for: another mmpretrain model, or a changed layout)."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, rename in _RULES:
            m = pattern.match(key)
            if m:
                out[rename(m)] = value
                break
        else:
            unknown.append(key)
    return out, unknown
