"""Building blocks of XCiT, one small module per concept.

Every forward calls its submodules, exactly where the official module graph does, so forward
hooks, module replacement (LoRA, pruning), quantisation, FX, tracing and export see every layer.
Module and parameter names follow the official release (``local_mp``, ``gamma1/2/3``,
``pos_embeder``...) so that official state dicts load without renaming.

Some forwards take a shorter but exact route that needs no bypass of any module: XCA normalises
the d x d Gram matrix instead of the N x d queries and keys, class attention uses the cls query
only, and the stem, positional encoding and LPI run channels-last so that (B, N, C) tokens and
(B, C, Hp, Wp) maps are views of each other. Speed-ups that do bypass modules (folding, fused
kernels) live in the explicit inference transform :func:`xcit.models.optimize.optimize`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
NORM_EPS = 1e-12  # F.normalize's clamp (written as a literal in channel_attention for TorchScript)


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


def tokens_to_map(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """(B, N, C) tokens as a (B, C, Hp, Wp) map: a channels-last view, no copy."""
    return x.reshape(x.shape[0], hp, wp, x.shape[-1]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, Hp, Wp) map as (B, N, C) tokens (a view when the map is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class Mlp(nn.Module):
    """Feed-forward network: Linear -> GELU -> Linear (keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvPatchEmbed(nn.Module):
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
        """Patch tokens (B, N, C) and the grid (Hp, Wp)."""
        # Channels-last all the way: the last stage's output is then already in token layout.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        hp, wp = x.shape[-2], x.shape[-1]
        return map_to_tokens(x), hp, wp


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

    def encoding(self, hp: int, wp: int, device: torch.device) -> torch.Tensor:
        """The (hp, wp, 2 * hidden_dim) sine/cosine features, fp32."""
        rows = torch.arange(1, hp + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, wp + 1, dtype=torch.float32, device=device)
        y = (rows / (hp + self.eps) * self.scale)[:, None].expand(hp, wp)
        x = (cols / (wp + self.eps) * self.scale)[None, :].expand(hp, wp)
        return torch.cat((self._embed_axis(y), self._embed_axis(x)), dim=-1)

    def forward(self, hp: int, wp: int) -> torch.Tensor:
        """Encoding of an ``hp`` x ``wp`` grid as (1, hp * wp, dim) tokens."""
        weight = self.token_projection.weight
        pos = self.encoding(hp, wp, weight.device).to(weight.dtype)
        return map_to_tokens(self.token_projection(pos.unsqueeze(0).permute(0, 3, 1, 2)))


def channel_attention(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``softmax(normalize(q).T @ normalize(k) * temperature)`` for q, k (B, h, N, d), normalised over N.

    Exact algebra: the Gram matrix q^T k (d x d per head) is divided by the outer product of the
    token-axis norms (clamped at 1e-12 like ``F.normalize``) instead of normalising the N x d
    tensors (:func:`attention_from_gram`, which the optimised kernel calls with its own Gram matrix
    and norms). Norms, scaling and softmax run in at least fp32. Returns (B, h, d, d).
    """
    gram = torch.matmul(q.transpose(-2, -1), k)
    dtype = torch.promote_types(gram.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    # sqrt(sum of squares) over the token axis; measured 3x faster here than vector_norm(dim=-2)
    return attention_from_gram(gram, (q * q).sum(dim=-2).sqrt(), (k * k).sum(dim=-2).sqrt(), temperature)


def attention_from_gram(gram: torch.Tensor, q_norms: torch.Tensor, k_norms: torch.Tensor,
                        temperature: torch.Tensor) -> torch.Tensor:
    """The XCA softmax from the Gram matrix q^T k (B, h, d, d) and the token-axis norms (B, h, d), in >= fp32."""
    dtype = torch.promote_types(gram.dtype, torch.float32)
    nq = q_norms.to(dtype).clamp_min(1e-12)  # (B, h, d); 1e-12 is F.normalize's clamp
    nk = k_norms.to(dtype).clamp_min(1e-12)
    row = temperature.reshape(-1, 1).to(dtype) / nq
    return (gram.to(dtype) * row.unsqueeze(-1) / nk.unsqueeze(-2)).softmax(dim=-1)


def _onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is capturing the model (TorchScript, which cannot compile the query, gets False)."""
    if not torch.jit.is_scripting():
        return torch.onnx.is_in_onnx_export()
    return False


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

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as (B, h, N, d); the channel axis d is what attends."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if _onnx_exporting():  # one Split node; the Slice of [:2] ran on OpenVINO's reference kernel (5 ms at 224 px)
            q, k, v = qkv.unbind(0)
            return q, k, v
        q, k = qkv[:2].contiguous().unbind(0)  # one copy for both; v is used strided
        return q, k, qkv[2]

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, h, d, d) channel attention and the values as (B, h, d, N) (for visualisation)."""
        q, k, v = self._qkv(x)
        return channel_attention(q, k, self.temperature), v.transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        attn = self.attn_drop(channel_attention(q, k, self.temperature)).to(v.dtype)
        if _onnx_exporting():
            # The same product as one ONNX Einsum node. NNCF leaves it in float; as MatMul(v, attn^T) it quantised
            # the transposed v, which OpenVINO then transposed as int8 data slowly (0.88-0.92x timm's graph at
            # 224 px, level with it as an Einsum; benchmarks/RESULTS.md). Elsewhere the matmul: Inductor's int8
            # graph copies v unfused before an einsum's bmm (2-3 % slower int8).
            out = torch.einsum("bhnd,bhed->bhne", v, attn)
        else:
            out = torch.matmul(v, attn.transpose(-2, -1))  # (B, h, N, d): out[n, i] = sum_j attn[i, j] v[n, j]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv -> GELU -> BN -> depthwise 3x3 conv on the grid."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)

    def forward(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """LPI of tokens ``x`` (B, N, C) on an ``hp`` x ``wp`` grid (channels-last: no transposes)."""
        y = self.conv2(self.bn(self.act(self.conv1(tokens_to_map(x, hp, wp)))))
        return map_to_tokens(y)


class XCABlock(nn.Module):
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
        # x + drop_path(gamma * f(x)) in one pass: drop path scales whole samples, so it commutes with gamma
        x = torch.addcmul(x, self.drop_path(self.attn(self.norm1(x))), self.gamma1)
        x = torch.addcmul(x, self.drop_path(self.local_mp(self.norm3(x), hp, wp)), self.gamma3)
        x = torch.addcmul(x, self.drop_path(self.mlp(self.norm2(x))), self.gamma2)
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
        q, k, v = self._qkv(x)
        # indexing rather than squeeze(2), which ONNX exports as two If nodes under dynamic axes
        logits = torch.matmul(q * self.scale, k.transpose(-2, -1))[:, :, 0]
        return logits.softmax(dim=-1), v

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cls query (B, h, 1, d), keys and values (B, h, N, d)."""
        if not torch.jit.is_scripting():  # noqa: SIM102 - TorchScript skips this body only as a test of its own
            if _onnx_exporting() and type(self.qkv) is nn.Linear and not (
                self.qkv._forward_hooks or self.qkv._forward_pre_hooks
            ):
                return self._exported_qkv(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q[:, :, :1], k, v

    def _exported_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_qkv` in an exported graph: the query of the cls token alone (the same rows of the same
        product), not of every token, 1/3 of the layer's work at 224 px. A replaced or hooked qkv runs as a module."""
        b, n, c = x.shape
        h = self.num_heads
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:c], None if bias is None else bias[:c]).reshape(b, 1, h, c // h).transpose(1, 2)
        kv = F.linear(x, w[c:], None if bias is None else bias[c:]).reshape(b, n, 2, h, c // h)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        attn, v = self.attention(x)
        cls = torch.matmul(self.attn_drop(attn).unsqueeze(2), v).transpose(1, 2).reshape(b, 1, c)
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
        x = torch.addcmul(x, self.attn(self.norm1(x)), self.gamma1)
        if self.tokens_norm:
            x = self.norm2(x)
            cls = x[:, :1]
        else:
            cls = self.norm2(x[:, :1])
        cls = torch.addcmul(cls, self.mlp(cls), self.gamma2)
        return torch.cat([cls, 2 * x[:, 1:]], dim=1)
