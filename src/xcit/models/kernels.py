"""Kernels of the optimised inference model (:mod:`xcit.models.optimize`), exact algebra throughout.

Each function computes what a group of XCiT modules computes, from (folded) weights rather than
through the modules: XCA with the attention folded into the value and output projections,
class attention from the cls query alone, convolutions and linears with their GELU or residual
addition fused. ``dnn=True`` runs fp32 CPU products through oneDNN's fused kernels
(``torch.ops.mkldnn``) in eager execution; under tracing, export or ``torch.compile`` every
function uses ``aten`` operations only (so exported graphs hold no op outside ``aten``) and avoids
branching on dynamic sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import attention_from_gram

FOLD_CHOICES = ("auto", "always", "never")


def _has_onednn() -> bool:
    try:
        ops = torch.ops.mkldnn
        return bool(torch.backends.mkldnn.is_available()) and hasattr(ops, "_linear_pointwise") and hasattr(
            ops, "_convolution_pointwise"
        )
    except Exception:  # pragma: no cover - exotic builds
        return False


HAS_ONEDNN = _has_onednn()


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch < 2.6 has no such query


def graph_capture() -> bool:
    """Whether the forward is being traced, exported or compiled rather than run eagerly."""
    return (
        torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


def exporting() -> bool:
    """Graph capture whose sizes must stay symbolic (export, tracing): no branch on token counts."""
    return _is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _dnn_fp32(dnn: bool, *tensors: torch.Tensor | None) -> bool:
    """oneDNN fp32 kernels apply: asked for, eager, CPU fp32 tensors, no autocast."""
    if not (dnn and HAS_ONEDNN) or graph_capture() or torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def _dnn_bf16_autocast(dnn: bool, x: torch.Tensor) -> bool:
    """CPU bf16 autocast where oneDNN's bf16 kernels with a fused GELU can be called directly (eager)."""
    return (
        dnn and HAS_ONEDNN and x.device.type == "cpu" and not graph_capture()
        and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def _bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.bfloat16)


class PackedWeights:
    """oneDNN's pre-packed (blocked) copies of bf16 linear weights, made on first use in eager execution.

    What Inductor's ``freezing`` does for a compiled model, for the eager one: the weight is reordered
    into oneDNN's blocked layout once instead of at every product (about 3 % of every bf16 GEMM here).
    A cache, not state: entries are keyed by the weight's storage, shape and version (a weight changed
    in place is packed again), and copies / pickles start empty (packed tensors have no storage).
    """

    def __init__(self) -> None:
        self._store: dict = {}

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride())
        hit = self._store.get(key)
        if hit is None or hit[0] != weight._version:
            hit = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()))
            self._store[key] = hit
        return hit[1]

    def __len__(self) -> int:
        return len(self._store)

    def __deepcopy__(self, memo: dict) -> PackedWeights:
        return PackedWeights()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._store = {}


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` for any device type (the meta device, used to count FLOPs, has none)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products run in: the autocast dtype where autocast is on, else ``x``'s."""
    if autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# --------------------------------------------------------------------------------------------
# Linear layers and convolutions
# --------------------------------------------------------------------------------------------


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False, dnn: bool = True,
    packed: PackedWeights | None = None,
) -> torch.Tensor:
    """``F.linear`` (then exact GELU if ``gelu``), one fused oneDNN kernel where it applies.

    ``packed``: a cache of pre-packed weights, used for bf16 weights under bf16 autocast (eager).
    """
    if packed is not None and weight.dtype == torch.bfloat16 and weight.dim() == 2 and _dnn_bf16_autocast(dnn, x):
        return torch.ops.mkldnn._linear_pointwise(_bf16(x), packed.get(weight), _bf16(bias), "gelu" if gelu else "none",
                                                  [], "none" if gelu else "")
    if _dnn_fp32(dnn, x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    if gelu and _dnn_bf16_autocast(dnn, x):
        # What autocast would run (bf16 matmul, oneDNN) with the GELU fused into it.
        return torch.ops.mkldnn._linear_pointwise(_bf16(x), _bf16(weight), _bf16(bias), "gelu", [], "none")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor, dnn: bool = True,
    packed: PackedWeights | None = None,
) -> torch.Tensor:
    """``other + F.linear(x, weight, bias)``, added in place into the fresh product when eager."""
    y = linear(x, weight, bias, dnn=dnn, packed=packed)
    if not graph_capture() and y.shape == other.shape and y.dtype == other.dtype:
        return y.add_(other)
    return other + y


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int, groups: int,
    gelu: bool = False, dnn: bool = True,
) -> torch.Tensor:
    """``F.conv2d`` (then exact GELU if ``gelu``), one fused oneDNN kernel where it applies."""
    if _dnn_fp32(dnn, x, weight, bias):
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [padding, padding], [stride, stride], [1, 1], groups, "gelu" if gelu else "none", [],
            "none" if gelu else None,
        )
    if gelu and _dnn_bf16_autocast(dnn, x):
        return torch.ops.mkldnn._convolution_pointwise(
            _bf16(x), _bf16(weight), _bf16(bias), [padding, padding], [stride, stride], [1, 1], groups, "gelu", [],
            "none",
        )
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    return F.gelu(y) if gelu else y


def conv2d_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, other: torch.Tensor,
    dnn: bool = True,
) -> torch.Tensor:
    """``other + F.conv2d(x, ...)`` (stride 1), one fused oneDNN kernel where it applies."""
    channels_last = torch.channels_last
    fusable = other.is_contiguous(memory_format=channels_last) and x.is_contiguous(memory_format=channels_last)
    if fusable and _dnn_fp32(dnn, x, weight, bias, other):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight, bias, [padding, padding], [1, 1], [1, 1], groups, "add", None, None, [], None
        )
    if fusable and _dnn_bf16_autocast(dnn, x) and other.dtype == torch.bfloat16:  # autocast's bf16 conv, add fused
        return torch.ops.mkldnn._convolution_pointwise.binary(
            _bf16(x), other, _bf16(weight), _bf16(bias), [padding, padding], [1, 1], [1, 1], groups, "add", None,
            None, [], None
        )
    return other + F.conv2d(x, weight, bias, 1, padding, 1, groups)


def plain_layer_norm(x: torch.Tensor, shape: tuple[int, ...], unit: torch.Tensor, zero: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """LayerNorm without an affine (the affine folded into the next product), through the affine kernel.

    ``unit`` / ``zero``: ones and zeros of the normalised ``shape``. The values are those of
    ``F.layer_norm(x, shape, None, None, eps)`` bit for bit, but PyTorch's CPU kernel without a
    weight and bias runs 3-4x slower than with them on float32 input (measured at (16, 196, 384),
    fp32 and autocast). On bf16 input it is the other way round (0.50 vs 0.52-0.58 ms).
    """
    if x.dtype == torch.bfloat16:
        return F.layer_norm(x, shape, None, None, eps)
    if unit.dtype != x.dtype and not autocast_enabled(x.device.type):
        unit, zero = unit.to(x.dtype), zero.to(x.dtype)
    return F.layer_norm(x, shape, unit, zero, eps)


# --------------------------------------------------------------------------------------------
# Cross-covariance attention
# --------------------------------------------------------------------------------------------


def fold_choice(fold: str, n_tokens: int, dim: int) -> bool:
    """Whether XCA folds the attention into the projections: ``"auto"`` folds when N > C.

    Under export and tracing the token count is symbolic, so nothing is folded there.
    """
    if fold == "never" or exporting():
        return False
    return fold == "always" or n_tokens > dim


def xca(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    temperature: torch.Tensor,
    num_heads: int,
    residual: torch.Tensor | None = None,
    fold: str = "auto",
    dnn: bool = True,
    packed: PackedWeights | None = None,
) -> torch.Tensor:
    """Cross-covariance attention of tokens ``x`` (B, N, C), plus ``residual`` if given.

    Queries and keys are produced channel-major, (2C, B*N) = W_qk @ X^T, so the per-head Gram
    matrices read contiguous rows. Then either values in token layout, the d x d attention applied
    per head and the output projection; or (folding, N > C) the attention folded into one
    per-image matrix M = W_proj blockdiag(A) W_v, c = W_proj blockdiag(A) b_v + b_proj and
    y = x M^T + c, which skips the value projection and the attention product.
    """
    b, n, c = x.shape
    h = num_heads
    d = c // h
    if _dnn_bf16_autocast(dnn, x):
        x = x.to(torch.bfloat16)  # once for both products (autocast would cast it for each)
    qk = linear(w_qkv[: 2 * c], x.reshape(b * n, c), None, dnn=dnn)  # (2C, B*N): channels as rows
    if b_qkv is not None:
        bias = b_qkv[: 2 * c, None].to(qk.dtype)
        qk = qk + bias if graph_capture() else qk.add_(bias)
    gram = _channel_gram(qk, b, h, d, n)
    attn = attention_from_gram(gram, *_token_norms(qk, b, h, d, n), temperature)  # (B, h, d, d)
    w_v = w_qkv[2 * c:]
    b_v = b_qkv[2 * c:] if b_qkv is not None else None
    if fold_choice(fold, n, c):
        return _xca_folded(x, attn, w_v, b_v, w_proj, b_proj, residual, dnn)
    v = linear(x, w_v, b_v, dnn=dnn, packed=packed).view(b, n, h, d)
    out = torch.matmul(v.transpose(1, 2), attn.to(v.dtype).transpose(-2, -1))  # (B, h, N, d)
    out = out.transpose(1, 2).reshape(b, n, c)
    if residual is None:
        return linear(out, w_proj, b_proj, dnn=dnn, packed=packed)
    return linear_add(out, w_proj, b_proj, residual, dnn=dnn, packed=packed)


def _eager_bf16(qk: torch.Tensor) -> bool:
    return qk.dtype == torch.bfloat16 and not graph_capture()


def _token_norms(qk: torch.Tensor, b: int, h: int, d: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-axis norms of queries and keys, (B, h, d) each, from channel-major rows (2C, B*N).

    At least float32, except eager bf16: there the reduction accumulates in float32 and rounds the
    norm once to bf16 (as ``F.normalize`` in the official code does under autocast), since a float32
    result would first copy all of ``qk`` into float32 (3.5x the reduction's time at 224 px batch 16).
    """
    dtype = qk.dtype if _eager_bf16(qk) else torch.promote_types(qk.dtype, torch.float32)
    norms = torch.linalg.vector_norm(qk.view(2, h, d, b, n), dim=-1, dtype=dtype)  # along the contiguous rows
    q_norms, k_norms = norms.permute(0, 3, 1, 2).unbind(0)
    return q_norms, k_norms


def _channel_gram(qk: torch.Tensor, b: int, h: int, d: int, n: int) -> torch.Tensor:
    """The per-head Gram matrices q^T k (B, h, d, d) from channel-major queries and keys (2C, B*N).

    Eager fp32 on CPU runs one strided batched product per head straight from the rows (1.6x faster
    than one product on the permuted view, which copies it first; 1.02x the whole model at 224 px
    batch 16, XCiT-S12). Eager bf16 copies the rows once into per-head order (B*h, d, N) and runs one
    product of row-major operands (1.4x faster than the product on the permuted view, which copies
    the keys column by column). Graph capture takes the single product.
    """
    rows = qk.view(2, h, d, b, n)
    if qk.dtype == torch.float32 and qk.device.type == "cpu" and not graph_capture():
        return torch.stack([torch.bmm(rows[0, i].transpose(0, 1), rows[1, i].permute(1, 2, 0)) for i in range(h)],
                           dim=1)
    if _eager_bf16(qk):
        q, k = rows.permute(0, 3, 1, 2, 4).reshape(2, b * h, d, n).unbind(0)
        return torch.bmm(q, k.transpose(1, 2)).view(b, h, d, d)
    q, k = rows.permute(0, 3, 1, 4, 2).unbind(0)  # (B, h, N, d) views of the rows
    return torch.matmul(q.transpose(-2, -1), k)


def _xca_folded(
    x: torch.Tensor, attn: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor | None, w_proj: torch.Tensor,
    b_proj: torch.Tensor | None, residual: torch.Tensor | None, dnn: bool,
) -> torch.Tensor:
    b, n, c = x.shape
    h, d = attn.shape[1], attn.shape[-1]
    dtype = autocast_dtype(x)
    a = attn.to(dtype)
    # P = W_proj blockdiag(A): (B, C, C), C^2 d multiply-adds per image.
    p = torch.matmul(w_proj.to(dtype).view(c, h, d).transpose(0, 1), a)  # (B, h, C_out, d)
    p = p.permute(0, 2, 1, 3).reshape(b, c, c)
    # M = P W_v for all images in one product (C^3 per image).
    m = linear(p.reshape(b * c, c), w_v.to(dtype).t().contiguous(), None, dnn=dnn).view(b, c, c)
    bias = torch.matmul(p, b_v.to(dtype)) if b_v is not None else None  # (B, C)
    if b_proj is not None:
        bias = b_proj.to(dtype).expand(b, c) if bias is None else bias + b_proj.to(dtype)
    if graph_capture():  # one batched product, no Python loop over the batch
        y = torch.matmul(x.to(dtype), m.transpose(1, 2))
        y = y if bias is None else y + bias[:, None]
        return y if residual is None else residual + y
    outs = []
    for i in range(b):  # per image: oneDNN's fused linear beats a batched product here
        bi = None if bias is None else bias[i]
        outs.append(linear(x[i], m[i], bi, dnn=dnn) if residual is None else linear_add(x[i], m[i], bi, residual[i], dnn=dnn))
    return outs[0].unsqueeze(0) if b == 1 else torch.stack(outs)  # batch 1: a view, not a copy


def class_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    num_heads: int,
    scale: float,
    dnn: bool = True,
    packed: PackedWeights | None = None,
) -> torch.Tensor:
    """CaiT class attention output for the cls token, (B, 1, C), computing one query only.

    logits_h = x (W_k,h^T q_h) + q_h . b_k,h and out_h = W_v,h (a_h^T x) + b_v,h sum(a_h), so
    neither keys nor values of the N patch tokens are materialised: O(N C h) instead of O(N C^2).
    """
    b, t, c = x.shape
    h = num_heads
    d = c // h
    w_k, w_v = w_qkv[c:].view(2, h, d, c).unbind(0)
    q = linear(x[:, 0], w_qkv[:c], None if b_qkv is None else b_qkv[:c], dnn=dnn, packed=packed).view(b, h, 1, d) * scale
    u = torch.matmul(q, w_k.to(q.dtype))  # (B, h, 1, C)
    logits = torch.matmul(u.squeeze(2), x.transpose(1, 2).to(u.dtype))  # (B, h, T)
    if b_qkv is not None:
        logits = logits + torch.matmul(q, b_qkv[c: 2 * c].view(h, d, 1).to(q.dtype)).squeeze(-1)
    attn = logits.float().softmax(dim=-1)
    z = torch.matmul(attn.to(autocast_dtype(x)), x.to(autocast_dtype(x)))  # (B, h, C)
    out = torch.matmul(z.unsqueeze(2), w_v.transpose(1, 2).to(z.dtype)).squeeze(2)  # (B, h, d)
    if b_qkv is not None:
        out = out + b_qkv[2 * c:].view(h, d).to(out.dtype) * attn.sum(dim=-1, keepdim=True).to(out.dtype)
    return linear(out.reshape(b, 1, c), w_proj, b_proj, dnn=dnn, packed=packed)


# --------------------------------------------------------------------------------------------
# Zero-padding border correction for a per-channel affine folded through a depthwise conv
# --------------------------------------------------------------------------------------------


def border_sums(taps: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel sums :func:`subtract_border_sums` applies, from ``taps`` (C, K, K), computed once.

    A depthwise conv of ``z + t`` (``t`` a per-channel constant) equals the conv of ``z`` plus
    ``t * sum(kernel)`` except near the border, where padded taps contribute nothing; with
    ``taps = t * kernel`` these sums restore exactness there.

    ``sides[r]`` (4, C): what row ``r`` from the top, from the bottom, column ``r`` from the left and
    from the right miss; ``corners[r, s]`` (4, C): the taps missed both ways at the four corners
    (top-left, top-right, bottom-left, bottom-right), which the sides subtract twice.
    """
    c, k, p = taps.shape[0], taps.shape[-1], padding
    if p == 0:
        return taps.new_zeros(0, 4, c), taps.new_zeros(0, 0, 4, c)
    near = [list(range(0, p - r)) for r in range(p)]  # taps missed by row/column r from the start
    far = [list(range(k - (p - r), k)) for r in range(p)]  # ... and from the end

    def missed(rows: list[int], cols: list[int]) -> torch.Tensor:
        return taps[:, rows][:, :, cols].sum(dim=(1, 2))

    every = list(range(k))
    sides = torch.stack([torch.stack([missed(near[r], every), missed(far[r], every), missed(every, near[r]),
                                      missed(every, far[r])]) for r in range(p)])
    corners = torch.stack([torch.stack([torch.stack([missed(rows, cols) for rows in (near[r], far[r])
                                                     for cols in (near[s], far[s])]) for s in range(p)])
                           for r in range(p)])
    return sides, corners


def subtract_border_sums(y: torch.Tensor, sides: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """In place on ``y`` (B, C, H, W): the zero-padding correction from :func:`border_sums` (padding ``p``).

    Each side is corrected independently (rows missed at the top, at the bottom, columns at the
    left, at the right, and the doubly subtracted corner taps added back). The missed tap sets of
    opposite sides are disjoint, so this is exact for every grid size, including 1 x W grids where
    one row is both the top and the bottom row; with ``padding == 1`` it indexes only rows/columns
    0 and -1, so it needs no concrete grid size (dynamic shapes under torch.export). Eight in-place
    updates for ``padding == 1``, none of them on the interior.
    """
    p = sides.shape[0]
    hh, ww = y.shape[-2:]
    if p != 1 and (hh < p or ww < p):  # pragma: no cover - only LPI kernels > 3 on tiny grids
        raise ValueError(f"grid {hh}x{ww} smaller than the padding {p}")
    sides, corners = sides.to(y.dtype)[..., None], corners.to(y.dtype)
    for r in range(p):
        top, bottom, left, right = sides[r].unbind(0)
        y[:, :, r, :] -= top
        y[:, :, -1 - r, :] -= bottom
        y[:, :, :, r] -= left
        y[:, :, :, -1 - r] -= right
    for r in range(p):
        for s in range(p):
            tl, tr, bl, br = corners[r, s].unbind(0)
            y[:, :, r, s] += tl
            y[:, :, r, -1 - s] += tr
            y[:, :, -1 - r, s] += bl
            y[:, :, -1 - r, -1 - s] += br
    return y
