"""What XCiT attends to: class-attention maps over patches and XCA channel-attention matrices.

:func:`forward_with_attention` runs the model's own ``forward`` once and records, through
temporary forward pre-hooks on the blocks, the exact attention of the requested layers: from the
input each block received, ``block.attn.attention(block.norm1(x))`` (``ClassAttention.attention`` /
``XCA.attention``, which materialise the softmax whatever route the forward itself takes). The
logits it returns are those of ``model(x)``, bit for bit, and the model is left unchanged (hooks are
removed even on error).
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.xcit import XCiT


@dataclass
class AttentionMaps:
    """Attention recorded during one forward pass of a batch.

    Attributes:
        logits: (B, num_classes), equal to ``model(x)``.
        cls_attn: (B, heads, Hp, Wp) cls-to-patch attention of class-attention layer ``cls_layer``,
            renormalised over patches (each map sums to 1) when ``renormalised`` is True.
        cls_self: (B, heads) attention the cls token pays to itself; the raw patch weights sum to
            ``1 - cls_self``.
        xca: block index -> (B, heads, d, d) channel attention (each row sums to 1).
        cls_layer: index of the class-attention layer the maps come from (non-negative).
        renormalised: whether ``cls_attn`` was divided by its sum over patches.
        patch_size: the model's patch size (to map the grid back to pixels).
    """

    logits: torch.Tensor
    cls_attn: torch.Tensor
    cls_self: torch.Tensor
    cls_layer: int
    renormalised: bool
    patch_size: int
    xca: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        """(Hp, Wp): the patch grid of the input."""
        return tuple(self.cls_attn.shape[-2:])

    def raw_cls_attn(self) -> torch.Tensor:
        """The cls-to-patch weights as the softmax produced them (sum over patches = 1 - cls_self)."""
        if not self.renormalised:
            return self.cls_attn
        return self.cls_attn * (1.0 - self.cls_self)[..., None, None]

    def upsampled(self, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """``cls_attn`` resized to pixels (B, heads, H, W) for an input of ``size`` = (H, W).

        The grid covers ceil(H / p) x ceil(W / p) patches of p x p pixels; the maps are upsampled to
        that padded extent and cropped to (H, W), so each patch lands on the pixels it saw.
        """
        h, w = size
        hp, wp = self.grid
        p = self.patch_size
        if -(-h // p) != hp or -(-w // p) != wp:
            raise ValueError(f"expected an input size whose {p}-pixel patch grid is {hp}x{wp}, got {h}x{w}")
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        maps = F.interpolate(self.cls_attn.float(), size=(hp * p, wp * p), mode=mode, **kwargs)
        return maps[..., :h, :w]


def _check_model(model) -> XCiT:
    if not isinstance(model, XCiT) or not getattr(model, "cls_attn_blocks", None):
        raise ValueError(f"expected an XCiT classifier with class-attention blocks, got {type(model).__name__}")
    return model


def forward_with_attention(
    model: XCiT,
    x: torch.Tensor,
    cls_layer: int = -1,
    xca_blocks: Iterable[int] = (),
    renormalise: bool = True,
) -> AttentionMaps:
    """Run ``model(x)`` once and return its logits with the attention of the chosen layers.

    Args:
        cls_layer: class-attention layer whose cls-to-patch attention is returned (-1: the last,
            the one the paper visualises).
        xca_blocks: XCA block indices (negative count from the end) whose d x d channel attention
            is returned.
        renormalise: divide the cls-to-patch weights by their sum over patches, so that each map is
            a distribution over patches (sums to 1). The raw softmax also weighs the cls token itself;
            its share is kept in ``cls_self``.

    Gradients flow if enabled by the caller; wrap in ``torch.no_grad()`` for plain inference.
    """
    model = _check_model(model)
    n_cls = len(model.cls_attn_blocks)
    if not -n_cls <= cls_layer < n_cls:
        raise ValueError(f"expected cls_layer in [{-n_cls}, {n_cls - 1}], got {cls_layer}")
    cls_layer %= n_cls
    depth = len(model.blocks)
    blocks = []
    for b in xca_blocks:
        if not -depth <= b < depth:
            raise ValueError(f"expected XCA block indices in [{-depth}, {depth - 1}], got {b}")
        blocks.append(b % depth)

    recorded: dict[str, torch.Tensor] = {}

    # Pre-hooks on the *blocks*: their input is the residual stream, and by the architecture's
    # definition (pre-norm blocks) the attention sees norm1 of it. This holds whatever fast or fused
    # path a block's forward takes internally (parameters, norm1's included, are never altered).
    def record_cls(block, args):
        attn, _ = block.attn.attention(block.norm1(args[0]))  # (B, heads, 1 + N), cls first
        recorded["cls"] = attn

    def record_xca(index):
        def hook(block, args):
            attn, _ = block.attn.attention(block.norm1(args[0]))  # (B, heads, d, d)
            recorded[f"xca{index}"] = attn
        return hook

    grid: dict[str, int] = {}

    def record_grid(_module, _args, output):
        _, hp, wp = output
        grid["hp"], grid["wp"] = int(hp), int(wp)

    with ExitStack() as stack:
        handles = [model.patch_embed.register_forward_hook(record_grid)]
        handles.append(model.cls_attn_blocks[cls_layer].register_forward_pre_hook(record_cls))
        for b in sorted(set(blocks)):
            handles.append(model.blocks[b].register_forward_pre_hook(record_xca(b)))
        for h in handles:
            stack.callback(h.remove)
        logits = model(x)

    attn = recorded["cls"]
    hp, wp = grid["hp"], grid["wp"]
    patches = attn[:, :, 1:]
    if patches.shape[-1] != hp * wp:
        raise AssertionError(f"class attention covers {patches.shape[-1]} patches, expected {hp}x{wp}")
    if renormalise:
        patches = patches / patches.sum(dim=-1, keepdim=True)
    return AttentionMaps(
        logits=logits,
        cls_attn=patches.reshape(attn.shape[0], attn.shape[1], hp, wp),
        cls_self=attn[:, :, 0],
        cls_layer=cls_layer,
        renormalised=renormalise,
        patch_size=model.patch_size,
        xca={b: recorded[f"xca{b}"] for b in blocks},
    )

