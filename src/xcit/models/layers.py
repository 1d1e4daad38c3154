"""Building blocks of XCiT, one small module per concept.

Module and parameter names follow the official release (``local_mp``, ``gamma1/2/3``,
``pos_embeder``...) so that official state dicts load without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath as fp

LN_EPS = 1e-6


class _FusableMixin:
    """Inference re-parameterisation state (see :mod:`xcit.models.fuse`).

    ``fuse`` stores folded weights in non-persistent buffers and sets ``fused``; the parameters and
    the state dict are untouched. Loading a state dict drops the folded copies (they would be stale),
    so reloading weights always gives back the plain module.
    """

    fused: bool = False
    _fused_names: tuple[str, ...] = ()

    def _set_fused(self, **tensors: torch.Tensor) -> None:
        self._clear_fused()
        for name, value in tensors.items():
            self.register_buffer("_f_" + name, value.detach().clone(), persistent=False)
        self._fused_names = tuple(tensors)
        self.fused = True

    def _clear_fused(self) -> None:
        for name in self._fused_names:
            self._buffers.pop("_f_" + name, None)
        self._fused_names = ()
        self.fused = False

    def _fz(self, name: str) -> torch.Tensor:
        return self._buffers["_f_" + name]

    def _check_fused_inference(self) -> None:
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} was fused for inference (model.fuse()); call model.eval(), or reload the "
                "weights (load_state_dict) / model.unfuse() before training"
            )

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear_fused()
        super()._load_from_state_dict(*args, **kwargs)


def _add_branch(x: torch.Tensor, gamma: torch.Tensor, branch: torch.Tensor, drop: "DropPath") -> torch.Tensor:
    """``x + drop_path(gamma * branch)``: one fused multiply-add unless drop path is active."""
    if drop.training and drop.rate > 0.0:
        return x + drop(gamma * branch)
    return torch.addcmul(x, branch, gamma)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    """Feed-forward network: Linear -> GELU -> Linear (keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fp.config.enabled:
            return self._forward_plain(x)
        x = fp.linear(x, self.fc1.weight, self.fc1.bias, gelu=True)  # GELU fused at inference
        return self.drop(fp.linear(self.drop(x), self.fc2.weight, self.fc2.bias))

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvPatchEmbed(_FusableMixin, nn.Module):
    """Convolutional stem: log2(patch_size) stride-2 3x3 conv + BN stages, GELU between stages.

    Channels double towards ``embed_dim`` (patch 16: C/8, C/4, C/2, C). Modules sit at the even
    indices of ``proj`` (GELUs at the odd ones), which is the official key layout.
    Output grid: ceil(H / patch_size) x ceil(W / patch_size).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        if patch_size not in (2, 4, 8, 16):
            raise ValueError(f"patch_size must be a power of two from 2 to 16, got {patch_size}")
        stages = int(math.log2(patch_size))
        if embed_dim % (2 ** (stages - 1)):
            raise ValueError(
                f"embed_dim {embed_dim} must be divisible by {2 ** (stages - 1)} for patch size {patch_size}"
            )
        self.patch_size = patch_size
        channels = [in_chans] + [embed_dim // 2 ** (stages - 1 - i) for i in range(stages)]
        layers: list[nn.Module] = []
        for i in range(stages):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(
                nn.Sequential(
                    nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(channels[i + 1]),
                )
            )
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if not fp.config.enabled:
            return self._forward_plain(x)
        # Channels-last: the last stage's output is then already (B, Hp, Wp, C) = token layout.
        x = x.contiguous(memory_format=torch.channels_last)
        stages = [m for m in self.proj if isinstance(m, nn.Sequential)]
        if self.fused:
            self._check_fused_inference()
            for i, stage in enumerate(stages):
                conv = stage[0]
                x = fp.conv2d(x, self._fz(f"w{i}"), self._fz(f"b{i}"), conv.stride[0], conv.padding[0], conv.groups,
                              gelu=i < len(stages) - 1)
        else:
            for i, stage in enumerate(stages):
                x = stage(x)
                if i < len(stages) - 1:
                    x = F.gelu(x)
        b, c, hp, wp = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, hp * wp, c), hp, wp

    def _forward_plain(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        hp, wp = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), hp, wp


class FourierPositionalEncoding(nn.Module):
    """Sine/cosine encoding of normalised (row, column) positions, projected to ``dim`` by a 1x1 conv.

    Computed for whatever grid the stem produced, so every input size has an encoding.
    """

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.scale = 2 * math.pi
        self.eps = 1e-6

    def _embed_axis(self, positions: torch.Tensor) -> torch.Tensor:
        dim_t = torch.arange(self.hidden_dim, dtype=torch.float32, device=positions.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos = positions[..., None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    def forward(self, hp: int, wp: int) -> torch.Tensor:
        """Encoding of an ``hp`` x ``wp`` grid as (1, hp * wp, dim) tokens."""
        device = self.token_projection.weight.device
        rows = torch.arange(1, hp + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, wp + 1, dtype=torch.float32, device=device)
        y = (rows / (hp + self.eps) * self.scale)[:, None].expand(hp, wp)
        x = (cols / (wp + self.eps) * self.scale)[None, :].expand(hp, wp)
        pos = torch.cat((self._embed_axis(y), self._embed_axis(x)), dim=-1)  # (hp, wp, 2 * hidden)
        weight = self.token_projection.weight
        if fp.config.enabled:
            # The 1x1 conv is a linear map on (hp * wp, 2 * hidden) tokens: contiguous (1, N, C) output.
            pos = pos.reshape(1, hp * wp, -1).to(weight.dtype)
            return fp.linear(pos, weight.reshape(weight.shape[0], -1), self.token_projection.bias)
        pos = pos.permute(2, 0, 1).unsqueeze(0).to(weight.dtype)
        return self.token_projection(pos).flatten(2).transpose(1, 2)


class XCA(nn.Module):
    """Cross-covariance attention: a d x d softmax attention between channels per head.

    Queries and keys are L2-normalised along the token axis, so the attention logits are
    cosine similarities scaled by a learnable per-head ``temperature``; cost is O(N d^2).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, h, d, d) channel attention and the values viewed as (B, h, d, N)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        return attn.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fp.config.enabled:
            return self._forward_plain(x)
        attn_drop = self.attn_drop if self.attn_drop.p > 0 and self.training else None
        y = fp.xca(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.temperature,
                   self.num_heads, attn_drop)
        return self.proj_drop(y)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        attn, v = self.attention(x)
        x = (self.attn_drop(attn) @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class LPI(_FusableMixin, nn.Module):
    """Local patch interaction: depthwise 3x3 conv -> GELU -> BN -> depthwise 3x3 conv on the grid."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)

    def forward(self, x: torch.Tensor, hp: int, wp: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """LPI of tokens ``x`` (B, N, C) on an ``hp`` x ``wp`` grid; fused models add ``residual``."""
        if not fp.config.enabled:
            out = self._forward_plain(x, hp, wp)
            return out if residual is None else residual + out
        b, n, c = x.shape
        # Tokens (B, N, C) are a channels-last (B, C, Hp, Wp) image: no transposes.
        x4 = x.reshape(b, hp, wp, c).permute(0, 3, 1, 2)
        c1, c2 = self.conv1, self.conv2
        z = fp.conv2d(x4, c1.weight, c1.bias, 1, c1.padding[0], c1.groups, gelu=True)
        if self.fused:
            self._check_fused_inference()
            # BN and the block's LayerScale are folded into conv2; the BN shift's zero-padding border
            # term is put back on the border rows and columns.
            r4 = residual.reshape(b, hp, wp, c).permute(0, 3, 1, 2)
            y = fp.conv2d_add(z, self._fz("w2"), self._fz("b2"), c2.padding[0], c2.groups, r4)
            fp.subtract_border_taps(y, self._fz("taps"), c2.padding[0])
        else:
            y = F.conv2d(self.bn(z), c2.weight, c2.bias, 1, c2.padding, 1, c2.groups)
        y = y.permute(0, 2, 3, 1).reshape(b, n, c)
        return y if residual is None or self.fused else residual + y

    def _forward_plain(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hp, wp)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(b, c, n).transpose(1, 2)


class XCABlock(_FusableMixin, nn.Module):
    """Pre-norm block: XCA, LPI and FFN residual branches, each scaled by a LayerScale gamma.

    ``norm3`` (for LPI) is registered before ``norm2`` (for the FFN), as in the official code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
        eta: float = 1.0,
    ) -> None:
        super().__init__()
        self.gamma1 = nn.Parameter(torch.full((dim,), float(eta)))
        self.gamma3 = nn.Parameter(torch.full((dim,), float(eta)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(eta)))
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = XCA(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path_rate)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.local_mp = LPI(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        if not fp.config.enabled:
            return self._forward_plain(x, hp, wp)
        if self.fused:
            return self._forward_fused(x, hp, wp)
        x = _add_branch(x, self.gamma1, self.attn(self.norm1(x)), self.drop_path)
        x = _add_branch(x, self.gamma3, self.local_mp(self.norm3(x), hp, wp), self.drop_path)
        x = _add_branch(x, self.gamma2, self.mlp(self.norm2(x)), self.drop_path)
        return x

    def _forward_fused(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """Inference with LayerScale and norm1/norm2 affines folded into the projections (``fuse``)."""
        self._check_fused_inference()
        fz = self._fz
        # the norms' own (constant) shapes: a traced x.shape[-1] would be a graph value to ONNX's layer_norm
        x = fp.xca(F.layer_norm(x, self.norm1.normalized_shape, None, None, self.norm1.eps), fz("qkv_w"), fz("qkv_b"),
                   fz("proj_w"), fz("proj_b"), self.attn.temperature, self.attn.num_heads, residual=x)
        x = self.local_mp(self.norm3(x), hp, wp, residual=x)
        h = fp.linear(F.layer_norm(x, self.norm2.normalized_shape, None, None, self.norm2.eps), fz("fc1_w"),
                      fz("fc1_b"), gelu=True)
        return fp.linear_add(h, fz("fc2_w"), fz("fc2_b"), x)

    def _forward_plain(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma3 * self.local_mp(self.norm3(x), hp, wp))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        return x


class ClassAttention(nn.Module):
    """CaiT class attention: only the cls token queries; patch tokens pass through (as given).

    Returns ``cat([proj(attn @ v), x[:, 1:]])`` where ``x`` is this module's (normalised) input,
    which is what the official block adds back to its residual.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls-to-all attention (B, h, N) over all tokens (cls first) and values (B, h, N, d)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q[:, :, :1] * k).sum(dim=-1) * self.scale
        return logits.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fp.config.enabled:
            return self._forward_plain(x)
        return torch.cat([self.forward_cls(x), x[:, 1:]], dim=1)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output of the cls token only, (B, 1, C)."""
        if not fp.config.enabled:
            return self._forward_plain(x)[:, :1]
        attn_drop = self.attn_drop if self.attn_drop.p > 0 and self.training else None
        cls = fp.class_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                                 self.num_heads, self.scale, attn_drop)
        return self.proj_drop(cls)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        attn, v = self.attention(x)
        cls = (self.attn_drop(attn).unsqueeze(2) @ v).transpose(1, 2).reshape(b, 1, c)
        cls = self.proj_drop(self.proj(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class ClassAttentionBlock(nn.Module):
    """Class-attention block with the official residual arithmetic, quirks included.

    Patch tokens gain ``gamma1 * norm1(x)`` from the attention branch and are doubled by the
    final residual; ``tokens_norm`` decides whether ``norm2`` also applies to patch tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        eta: float = 1.0,
        tokens_norm: bool = False,
    ) -> None:
        super().__init__()
        self.gamma1 = nn.Parameter(torch.full((dim,), float(eta)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(eta)))
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fp.config.enabled:
            return self._forward_plain(x)
        # Same arithmetic, cls token and patch tokens handled separately (no full-size concatenations
        # until the end): patches -> norm2?(x_p + gamma1 * norm1(x)_p) * 2.
        xn = self.norm1(x)
        cls = torch.addcmul(x[:, :1], self.attn.forward_cls(xn), self.gamma1)
        patches = torch.addcmul(x[:, 1:], xn[:, 1:], self.gamma1)
        cls = self.norm2(cls)
        if self.tokens_norm:
            patches = self.norm2(patches)
        cls = torch.addcmul(cls, self.mlp(cls), self.gamma2)
        return torch.cat([cls, patches * 2], dim=1)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma1 * self.attn(self.norm1(x))
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls = x[:, :1] + self.gamma2 * self.mlp(x[:, :1])
        return torch.cat([cls, 2 * x[:, 1:]], dim=1)
