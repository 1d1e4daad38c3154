"""Switches and kernels of the fast path (exact algebra, same results as the plain path up to rounding).

The layers in :mod:`xcit.models.layers` have two implementations of every forward:

* the *plain path*, a line-by-line transcription of the official computation, kept as the
  reference (``with plain_path(): ...`` or ``fastpath.config.enabled = False``);
* the *fast path* (default), which computes the same function with fewer passes over memory:
  XCA normalises the d x d Gram matrix instead of the N x d queries and keys, folds the value and
  output projections into one per-image C x C matrix when N > C, class attention works on one
  query, LPI runs channels-last, and on CPU the fp32 matrix products go through oneDNN (with GELU
  and residual additions fused into them at inference).

Settings live in :data:`config` and are read at every forward, so they can be changed at any time
(under ``torch.compile`` a change triggers a recompilation).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

__all__ = ["FastPathConfig", "config", "plain_path", "settings", "onednn_available"]


@dataclass
class FastPathConfig:
    """Process-wide fast-path settings.

    Attributes:
        enabled: ``False`` runs the plain (reference) path everywhere.
        fold: XCA value/output-projection folding: ``"auto"`` (when tokens N > channels C),
            ``"always"`` or ``"never"``.
        onednn: route fp32 CPU linears and convolutions through oneDNN (``torch.ops.mkldnn``),
            with fused GELU / residual additions at inference. On CPUs where torch's BLAS
            (MKL) lacks an AVX-512 code path, oneDNN is about twice as fast.
    """

    enabled: bool = True
    fold: str = "auto"
    onednn: bool = True


config = FastPathConfig()
_FOLD_CHOICES = ("auto", "always", "never")


@contextlib.contextmanager
def settings(**overrides) -> Iterator[FastPathConfig]:
    """Temporarily change fast-path settings: ``with settings(fold="never"): model(x)``."""
    names = {f.name for f in fields(FastPathConfig)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown fast-path setting {key!r}; known: {', '.join(sorted(names))}")
        if key == "fold" and value not in _FOLD_CHOICES:
            raise ValueError(f"fold must be one of {_FOLD_CHOICES}, got {value!r}")
    saved = {key: getattr(config, key) for key in overrides}
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        yield config
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def plain_path():
    """Context manager running the plain (reference) computations: ``with plain_path(): model(x)``."""
    return settings(enabled=False)


def _probe_onednn() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise"
        )
    except Exception:  # pragma: no cover - exotic builds
        return False


_HAS_ONEDNN = _probe_onednn()


def onednn_available() -> bool:
    """Whether this torch build exposes the oneDNN kernels the fast path can use."""
    return _HAS_ONEDNN


def use_onednn(*tensors: torch.Tensor | None) -> bool:
    """oneDNN fp32 kernels apply: enabled, CPU fp32 tensors, no autocast."""
    if not (config.onednn and _HAS_ONEDNN) or torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def autocast_bf16_onednn(x: torch.Tensor) -> bool:
    """CPU bf16 autocast where oneDNN kernels with fused GELU can be called directly (inference, eager)."""
    return (
        config.onednn and _HAS_ONEDNN and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling()
    )


def _bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.bfloat16)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------


def _dnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")


@torch.library.custom_op("xcit::onednn_linear", mutates_args=(), device_types="cpu")
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` (then exact GELU) with oneDNN: an opaque op to autograd and torch.compile.

    Inductor lowers ``mkldnn._linear_pointwise`` only for frozen (constant) weights, so compiled
    graphs call this op instead; autograd runs its backward products through oneDNN as well.
    """
    return _dnn_linear(x, weight, bias, "gelu" if gelu else "none")


@onednn_linear.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, gelu = inputs
    if gelu:
        raise RuntimeError("xcit::onednn_linear with fused GELU is inference-only")
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(g, weight.t().contiguous(), None, False).view(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = onednn_linear(g.t().contiguous(), x.reshape(-1, x.shape[-1]).t().contiguous(), None, False)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g.sum(0)
    return grad_x, grad_w, grad_b, None


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """``F.linear`` (then exact GELU if ``gelu``), through oneDNN for fp32 CPU tensors."""
    if use_onednn(x, weight, bias):
        if needs_grad(x, weight, bias):
            y = onednn_linear(x, weight, bias, False)
            return F.gelu(y) if gelu else y
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias, gelu)
        return _dnn_linear(x, weight, bias, "gelu" if gelu else "none")
    if gelu and autocast_bf16_onednn(x) and not needs_grad(x, weight, bias):
        # What autocast would run (bf16 matmul, oneDNN) with the GELU fused into it.
        return _dnn_linear(_bf16(x), _bf16(weight), _bf16(bias), "gelu")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """``other + F.linear(x, weight, bias)`` (in place on the fresh product at inference).

    oneDNN's fused "add" post-op (``_linear_pointwise.binary``) measured no faster than the
    separate in-place addition on this path, so it is not used.
    """
    y = linear(x, weight, bias)
    if not needs_grad(x, weight, bias, other) and y.shape == other.shape and y.dtype == other.dtype:
        return y.add_(other)
    return other + y


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for 2-d ``a``, ``b`` (a linear without bias, ``b`` in the weight's place)."""
    return linear(a, b, None)


# --------------------------------------------------------------------------------------------
# Convolutions (channels-last activations)
# --------------------------------------------------------------------------------------------


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int, groups: int,
    gelu: bool = False,
) -> torch.Tensor:
    """``F.conv2d`` (then exact GELU if ``gelu``), one fused oneDNN kernel at fp32 CPU inference."""
    if use_onednn(x, weight, bias) and not needs_grad(x, weight, bias) and not torch.compiler.is_compiling():
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [padding, padding], [stride, stride], [1, 1], groups, "gelu" if gelu else "none", [],
            "none" if gelu else None,
        )
    if gelu and autocast_bf16_onednn(x) and not needs_grad(x, weight, bias):
        return torch.ops.mkldnn._convolution_pointwise(
            _bf16(x), _bf16(weight), _bf16(bias), [padding, padding], [stride, stride], [1, 1], groups, "gelu", [], "none"
        )
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    return F.gelu(y) if gelu else y


def conv2d_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, other: torch.Tensor
) -> torch.Tensor:
    """``other + F.conv2d(x, ...)`` (stride 1), one fused oneDNN kernel at fp32 CPU inference."""
    if use_onednn(x, weight, bias, other) and not needs_grad(x, weight, bias, other) and not torch.compiler.is_compiling() and other.is_contiguous(
        memory_format=torch.channels_last
    ) and x.is_contiguous(memory_format=torch.channels_last):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight, bias, [padding, padding], [1, 1], [1, 1], groups, "add", None, None, [], None
        )
    return other + F.conv2d(x, weight, bias, 1, padding, 1, groups)


# --------------------------------------------------------------------------------------------
# Cross-covariance attention
# --------------------------------------------------------------------------------------------

NORM_EPS = 1e-12  # F.normalize's clamp


def channel_attention(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``softmax(normalize(q) @ normalize(k).T * temperature)`` from unnormalised q, k (B, h, d, N).

    Exact algebra: the Gram matrix q k^T (d x d) is divided by the outer product of the row norms
    (clamped at 1e-12 like ``F.normalize``) instead of normalising the N x d tensors. Norms,
    scaling and softmax run in fp32 whatever the input dtype. Returns fp32 (B, h, d, d).
    """
    gram = torch.matmul(q, k.transpose(-2, -1))
    nq = torch.linalg.vector_norm(q, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS)
    nk = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS)
    row = temperature.reshape(-1, 1).float() / nq  # (B, h, d): temperature folded into the query scale
    col = nk.reciprocal()
    return (gram.float() * row.unsqueeze(-1) * col.unsqueeze(-2)).softmax(dim=-1)


def fold_choice(n_tokens: int, dim: int) -> bool:
    """Whether XCA folds A into the projections: ``config.fold``, ``"auto"`` = when N > C."""
    if config.fold == "always":
        return True
    if config.fold == "never":
        return False
    return n_tokens > dim


def _heads_apply(v: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """out[b, n, h, i] = sum_j attn[b, h, i, j] v[b, n, h, j] for tokens v (B, N, h, d) -> (B, N, h * d).

    (Writing each head into a preallocated token-layout output with ``bmm(out=...)`` was tried: MKL
    then reads the uninitialised output, which can hold denormals, and became 1000x slower.)
    """
    b, n, h, d = v.shape
    out = torch.matmul(v.transpose(1, 2), attn.transpose(-2, -1))  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, h * d)


def xca(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    temperature: torch.Tensor,
    num_heads: int,
    attn_drop: torch.nn.Module | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-covariance attention of tokens ``x`` (B, N, C), plus ``residual`` if given.

    Queries and keys are produced channel-major, (2C, B*N) = W_qk @ X^T, so the per-head Gram
    matrices read contiguous rows. Then either (N <= C) values in token layout, the d x d
    attention applied per head, and the output projection; or (N > C) the attention folded into
    one per-image matrix M = W_proj blockdiag(A) W_v, c = W_proj blockdiag(A) b_v + b_proj and
    y = x M^T + c, which skips the value projection and the attention product entirely.
    """
    b, n, c = x.shape
    h = num_heads
    d = c // h
    tokens = x.reshape(b * n, c)
    grad = needs_grad(x, w_qkv, b_qkv, w_proj, b_proj, temperature)
    qk = mm_nt(w_qkv[: 2 * c], tokens)  # (2C, B*N), channels as rows
    if b_qkv is not None:
        bias = b_qkv[: 2 * c, None].to(qk.dtype)
        qk = qk + bias if grad else qk.add_(bias)
    qk = qk.view(2, h, d, b, n).permute(0, 3, 1, 2, 4)  # (2, B, h, d, N)
    attn = channel_attention(qk[0], qk[1], temperature)  # (B, h, d, d) fp32
    if attn_drop is not None:
        attn = attn_drop(attn)
    w_v = w_qkv[2 * c:]
    b_v = b_qkv[2 * c:] if b_qkv is not None else None
    if fold_choice(n, c):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") and x.device.type == "cpu" else x.dtype
        a = attn.to(dtype)
        # P = W_proj blockdiag(A): (B, C, C), C^2 d multiply-adds per image.
        p = torch.matmul(w_proj.to(dtype).view(c, h, d).transpose(0, 1), a)  # (B, h, C_out, d)
        p = p.permute(0, 2, 1, 3).reshape(b, c, c)
        # M = P W_v for all images in one product (C^3 per image): rows of P against columns of W_v.
        m = mm_nt(p.reshape(b * c, c), w_v.to(dtype).t().contiguous()).view(b, c, c)
        bias = None
        if b_v is not None:
            bias = torch.matmul(p, b_v.to(dtype))  # (B, C)
        if b_proj is not None:
            bias = b_proj.to(dtype).expand(b, c) if bias is None else bias + b_proj.to(dtype)
        outs = []
        for i in range(b):
            bi = None if bias is None else bias[i]
            if residual is None:
                outs.append(linear(x[i], m[i], bi))
            else:
                outs.append(linear_add(x[i], m[i], bi, residual[i]))
        return outs[0].unsqueeze(0) if b == 1 else torch.stack(outs)
    v = linear(x, w_v, b_v).view(b, n, h, d)
    out = _heads_apply(v, attn.to(v.dtype))
    if residual is None:
        return linear(out, w_proj, b_proj)
    return linear_add(out, w_proj, b_proj, residual)


def class_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    num_heads: int,
    scale: float,
    attn_drop: torch.nn.Module | None = None,
) -> torch.Tensor:
    """CaiT class attention output for the cls token, (B, 1, C), computing one query only.

    Exact algebra: logits_h = x (W_k,h^T q_h) + q_h . b_k,h and out_h = W_v,h (a_h^T x) + b_v,h sum(a_h),
    so neither keys nor values of the N patch tokens are materialised: O(N C h) instead of O(N C^2).
    """
    b, t, c = x.shape
    h = num_heads
    d = c // h
    w_q, w_k, w_v = w_qkv.view(3, h, d, c).unbind(0)
    q = linear(x[:, 0], w_qkv[:c], None if b_qkv is None else b_qkv[:c]).view(b, h, 1, d) * scale
    u = torch.matmul(q, w_k)  # (B, h, 1, C)
    logits = torch.matmul(u.squeeze(2), x.transpose(1, 2))  # (B, h, T)
    if b_qkv is not None:
        logits = logits + torch.matmul(q, b_qkv[c: 2 * c].view(h, d, 1).to(q.dtype)).squeeze(-1)
    attn = logits.float().softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    z = torch.matmul(attn.to(x.dtype), x)  # (B, h, C)
    out = torch.matmul(z.unsqueeze(2), w_v.transpose(1, 2).to(z.dtype)).squeeze(2)  # (B, h, d)
    if b_qkv is not None:
        out = out + b_qkv[2 * c:].view(h, d).to(out.dtype) * attn.sum(dim=-1, keepdim=True).to(out.dtype)
    return linear(out.reshape(b, 1, c), w_proj, b_proj)


# --------------------------------------------------------------------------------------------
# Zero-padding border correction for a per-channel affine folded through a depthwise conv
# --------------------------------------------------------------------------------------------


def subtract_border_taps(y: torch.Tensor, taps: torch.Tensor, padding: int) -> torch.Tensor:
    """In place: ``y[b, c, r, s] -= sum of taps[c, i, j] over kernel taps that fall in the zero padding``.

    A depthwise conv of ``z + t`` (``t`` a per-channel constant) equals the conv of ``z`` plus
    ``t * sum(kernel)`` except near the border, where padded taps contribute nothing; with
    ``taps = t * kernel`` this restores exactness there. Cost: border rows and columns only.

    Each side is corrected independently (rows missed at the top, at the bottom, columns at the
    left, at the right, and the doubly subtracted corner taps added back). The missed tap sets of
    opposite sides are disjoint, so this is exact for every grid size, including 1 x W grids where
    one row is both the top and the bottom row; with ``padding == 1`` it indexes only rows/columns
    0 and -1, so it needs no concrete grid size (dynamic shapes under torch.export).
    """
    k = taps.shape[-1]
    p = padding
    hh, ww = y.shape[-2:]
    if p != 1 and (hh < p or ww < p):  # pragma: no cover - only LPI kernels > 3 on tiny grids
        raise ValueError(f"grid {hh}x{ww} smaller than the padding {p}")
    taps = taps.to(y.dtype)
    # Side s at distance r (0-based) from its edge misses kernel indices: top rows i < p - r,
    # bottom rows i > k - 1 - (p - r); likewise columns.
    for r in range(p):
        top = list(range(0, p - r))
        bottom = list(range(k - (p - r), k))
        y[:, :, r, :] -= taps[:, top, :].sum(dim=(1, 2))[:, None]
        y[:, :, -1 - r, :] -= taps[:, bottom, :].sum(dim=(1, 2))[:, None]
        y[:, :, :, r] -= taps[:, :, top].sum(dim=(1, 2))[:, None]
        y[:, :, :, -1 - r] -= taps[:, :, bottom].sum(dim=(1, 2))[:, None]
    for r in range(p):
        rows = ((r, list(range(0, p - r))), (-1 - r, list(range(k - (p - r), k))))
        for s in range(p):
            cols = ((s, list(range(0, p - s))), (-1 - s, list(range(k - (p - s), k))))
            for ri, mr in rows:
                for si, ms in cols:
                    y[:, :, ri, si] += taps[:, mr][:, :, ms].sum(dim=(1, 2))
    return y
