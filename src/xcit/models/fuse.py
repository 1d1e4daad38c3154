"""Inference re-parameterisation: fold BatchNorm, LayerScale and LayerNorm affines into weights.

``fuse_model(model)`` (also ``model.fuse()``) computes, in float64, the folded weights below and
stores them as non-persistent buffers on the modules that use them; the parameters and the state
dict are not modified, so saving a fused model saves the original weights, and ``unfuse_model`` or
any ``load_state_dict`` returns to the plain modules. A fused model is inference-only: its forward
raises in training mode.

Folds (all exact algebra; fp32 results match the unfused model to rounding):

* stem: each ``Conv2d(bias=False) -> BatchNorm2d`` becomes one convolution with bias,
  w' = w * s, b' = t with s = gamma / sqrt(var + eps), t = beta - mean * s (GELU fused in);
* XCA block: ``norm1``'s affine into ``attn.qkv`` (W' = W diag(g), b' = b + W beta), ``gamma1`` into
  ``attn.proj`` (rows scaled), ``norm2``'s affine into ``mlp.fc1``, ``gamma2`` into ``mlp.fc2``;
* LPI: the BatchNorm and ``gamma3`` into ``conv2`` (depthwise): w' = gamma3 s w,
  b' = gamma3 (b + t sum(w)); the BN shift does not pass through zero padding, so the missing
  taps' share ``gamma3 t w[i, j]`` is subtracted on the border rows and columns
  (:func:`xcit.models.fastpath.subtract_border_taps`);
* residual additions of proj / conv2 / fc2 are fused into those kernels (oneDNN post-ops on CPU).

Not folded: ``norm3`` (its shift would also need border terms before the GELU, for no gain: the
LayerNorm kernel applies its affine in the same pass), the class-attention blocks (their norm1
output is also added to the residual) and the final norm.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LPI, ConvPatchEmbed, XCABlock

__all__ = ["fuse_model", "unfuse_model", "is_fused"]


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def _fold_norm_into_linear(norm: nn.LayerNorm, lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``lin(norm_without_affine(x))`` equal to ``lin(norm(x))``."""
    w = lin.weight.double()
    b = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if norm.weight is not None:
        w_new = w * norm.weight.double()[None, :]
    else:
        w_new = w
    if norm.bias is not None:
        b = b + w @ norm.bias.double()
    return w_new.to(lin.weight.dtype), b.to(lin.weight.dtype)


def _fold_scale_into_linear(gamma: torch.Tensor, lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``lin'(x) = gamma * lin(x)``."""
    g = gamma.double()
    w = lin.weight.double() * g[:, None]
    b = lin.bias.double() * g if lin.bias is not None else torch.zeros_like(g)
    return w.to(lin.weight.dtype), b.to(lin.weight.dtype)


@torch.no_grad()
def _fuse_patch_embed(embed: ConvPatchEmbed) -> None:
    tensors = {}
    stages = [m for m in embed.proj if isinstance(m, nn.Sequential)]
    for i, (conv, bn) in enumerate(stages):
        s, t = _bn_scale_shift(bn)
        w = conv.weight.double() * s[:, None, None, None]
        b = t if conv.bias is None else t + s * conv.bias.double()
        tensors[f"w{i}"] = w.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        tensors[f"b{i}"] = b.to(conv.weight.dtype)
    embed._set_fused(**tensors)


@torch.no_grad()
def _fuse_lpi(lpi: LPI, gamma3: torch.Tensor) -> None:
    s, t = _bn_scale_shift(lpi.bn)
    g = gamma3.double()
    conv2 = lpi.conv2
    w = conv2.weight.double()  # (C, 1, K, K), depthwise
    b = conv2.bias.double() if conv2.bias is not None else torch.zeros_like(g)
    w2 = w * (g * s)[:, None, None, None]
    b2 = g * (b + t * w.sum(dim=(1, 2, 3)))
    taps = (g * t)[:, None, None] * w[:, 0]
    dtype = conv2.weight.dtype
    lpi._set_fused(w2=w2.to(dtype), b2=b2.to(dtype), taps=taps.to(dtype))


@torch.no_grad()
def _fuse_block(block: XCABlock) -> None:
    if block.local_mp.conv2.groups != block.local_mp.conv2.in_channels:
        raise ValueError("LPI conv2 must be depthwise to fold its BatchNorm")
    qkv_w, qkv_b = _fold_norm_into_linear(block.norm1, block.attn.qkv)
    proj_w, proj_b = _fold_scale_into_linear(block.gamma1, block.attn.proj)
    fc1_w, fc1_b = _fold_norm_into_linear(block.norm2, block.mlp.fc1)
    fc2_w, fc2_b = _fold_scale_into_linear(block.gamma2, block.mlp.fc2)
    _fuse_lpi(block.local_mp, block.gamma3)
    block._set_fused(qkv_w=qkv_w, qkv_b=qkv_b, proj_w=proj_w, proj_b=proj_b, fc1_w=fc1_w, fc1_b=fc1_b,
                     fc2_w=fc2_w, fc2_b=fc2_b)


def fuse_model(model: nn.Module) -> nn.Module:
    """Fold BN / LayerScale / LayerNorm affines of every stem and XCA block of ``model`` (in place).

    Puts ``model`` in eval mode and returns it. Inference only: training mode raises until
    :func:`unfuse_model` or ``load_state_dict``. Fusing twice recomputes from the parameters.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvPatchEmbed):
            _fuse_patch_embed(module)
        elif isinstance(module, XCABlock):
            _fuse_block(module)
    return model


def unfuse_model(model: nn.Module) -> nn.Module:
    """Drop the folded copies: the model computes from its parameters again (and can train)."""
    for module in model.modules():
        if isinstance(module, (ConvPatchEmbed, LPI, XCABlock)):
            module._clear_fused()
    return model


def is_fused(model: nn.Module) -> bool:
    return any(getattr(m, "fused", False) for m in model.modules())
