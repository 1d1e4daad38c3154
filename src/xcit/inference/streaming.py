"""Exact XCiT inference on images of any size in bounded memory: :func:`streaming`.

Every operation of XCiT is either local or a sum over tokens, so the forward pass can be computed
in row tiles and token chunks and still give ``model(x)``:

- the convolutional stem is local: a tile of output rows needs a known range of input rows at each
  stride-2 stage (the *halo*); rows outside the image are the convolutions' zero padding;
- XCA needs, per head, the d x d Gram matrix ``q k^T`` and the L2 norms of the q and k channels over
  all tokens. Pass 1 accumulates them chunk by chunk (``q^ k^T = q k^T / (|q| |k|^T)``); pass 2
  applies the d x d attention, the projection, LPI (two 3x3 depthwise convolutions: two token rows
  of halo), the MLP and the residuals tile by tile, writing the block output in place;
- class attention is a softmax over all tokens for the cls query alone: a running (online) softmax
  over chunks. Its patch tokens only change elementwise (``2 * norm2?(x + gamma1 * norm1(x))``).

Only the token tensor (B, N, C), kept in fp32, is resident; everything else is bounded by
``tokens_per_chunk`` (the stem's tiles hold about 8 C floats per token). Under bf16 autocast the
Gram matrix, the norms and the softmax statistics are accumulated in fp32.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import NORM_EPS
from ..models.xcit import XCiT, XCiTTrunk

DEFAULT_TOKENS_PER_CHUNK = 16384


def streaming(
    model: XCiTTrunk,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tokens_per_chunk: int = DEFAULT_TOKENS_PER_CHUNK,
) -> StreamingXCiT:
    """A module computing exactly what ``model(x)`` computes, in memory bounded by the token tensor.

    ``model`` is an XCiT classifier in eval mode (an :class:`XCiTTrunk` such as the pyramid's
    supports :meth:`StreamingXCiT.forward_tokens` only). Inputs are float tensors (B, C, H, W), used as
    given, or uint8 images normalised tile by tile as ``(x / 255 - mean) / std``: a (B, C, H, W)
    tensor or numpy array, or an (H, W, C) numpy array / memmap (one image, channels last, as image
    readers return it). ``tokens_per_chunk`` bounds every temporary.
    """
    return StreamingXCiT(model, mean, std, tokens_per_chunk)


@dataclass
class StreamOutput:
    """What one streaming pass gives (batch B, C channels, Hp x Wp patch grid).

    Attributes:
        cls: (B, C) normalised cls token (``forward_features(x)[:, 0]``, the head's input).
        mean_patch: (B, C) mean of the normalised patch tokens (``forward_features(x)[:, 1:].mean(1)``).
        logits: (B, classes), ``model(x)``.
        grid: (Hp, Wp), the patch grid.
        features: (B, 1 + N, C) ``forward_features(x)`` when asked for, else None.
        attention: (B, heads, Hp, Wp) raw cls-to-patch softmax weights of the requested
            class-attention layer, else None; with ``cls_self`` (B, heads) they sum to 1.
    """

    cls: torch.Tensor
    mean_patch: torch.Tensor
    logits: torch.Tensor
    grid: tuple[int, int]
    features: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    cls_self: torch.Tensor | None = None


class StreamingXCiT(nn.Module):
    """The streaming forward of an XCiT (see the module docstring); build it with :func:`streaming`."""

    def __init__(self, model: XCiTTrunk, mean, std, tokens_per_chunk: int) -> None:
        super().__init__()
        if not isinstance(model, XCiTTrunk):
            raise ValueError(f"expected an XCiT model (XCiT or XCiTPyramid), got {type(model).__name__}")
        if isinstance(tokens_per_chunk, bool) or not isinstance(tokens_per_chunk, int) or tokens_per_chunk < 1:
            raise ValueError(f"expected tokens_per_chunk to be a positive integer, got {tokens_per_chunk!r}")
        from ..models import is_optimized

        if is_optimized(model):
            raise ValueError("expected the plain model, got an optimised copy (xcit.optimize): stream the model it was "
                             "made from (the streaming forward works from the plain layers)")
        _check_eval(model)
        self.model = model
        self.tokens_per_chunk = tokens_per_chunk
        c = model.in_chans
        self.mean = None if mean is None else _per_channel(mean, c, "mean")
        self.std = None if std is None else _per_channel(std, c, "std")
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"expected positive std values, got {std}")
        self.stages = _stem_stages(model.patch_embed.proj)

    # ----- public forwards -------------------------------------------------------------------
    def forward(self, x) -> torch.Tensor:
        """Logits, as ``model(x)``."""
        return self.run(x).logits

    def forward_features(self, x) -> torch.Tensor:
        """(B, 1 + N, C) normalised tokens, as ``model.forward_features(x)``."""
        return self.run(x, features=True).features

    @torch.no_grad()
    def forward_tokens(self, x) -> tuple[torch.Tensor, int, int]:
        """Output of the last XCA block (B, N, C) and the grid (Hp, Wp), as ``forward_blocks(embed(x))``."""
        _check_eval(self.model)
        device = next(self.model.parameters()).device
        image = _ImageRows(x, self.model.in_chans, self.mean, self.std, device)
        tokens, hp, wp = self._embed(image)
        for block in self.model.blocks:
            self._xca_block(block, tokens, hp, wp)
        return tokens, hp, wp

    @torch.no_grad()
    def forward_maps(self, x, indices: Sequence[int], store=None, pad_to: tuple[int, int] | None = None
                     ) -> tuple[list[torch.Tensor], int, int]:
        """Outputs of the XCA blocks ``indices`` as (B, N, C) token tensors (``get_intermediate_layers(x, indices)``
        before its reshape to maps), and the grid (Hp, Wp). The last one is the resident token tensor itself; the
        others are copied by ``store(tokens)`` (default ``clone``; :mod:`xcit.inference.dense` passes one that
        writes to a memory-mapped file). ``pad_to`` (H', W') zero-pads the normalised input at the bottom / right."""
        _check_eval(self.model)
        wanted = self.model._resolve_indices(indices)
        store = store or torch.clone
        device = next(self.model.parameters()).device
        image = _ImageRows(x, self.model.in_chans, self.mean, self.std, device, pad_to)
        tokens, hp, wp = self._embed(image)
        kept: dict[int, torch.Tensor] = {}
        last = max(wanted)
        for i, block in enumerate(self.model.blocks[: last + 1]):
            self._xca_block(block, tokens, hp, wp)
            if i in wanted:
                kept[i] = tokens if i == last else store(tokens)
        return [kept[i] for i in wanted], hp, wp

    @torch.no_grad()
    def run(self, x, *, features: bool = False, attention_layer: int | None = None) -> StreamOutput:
        """One streaming pass: logits, cls and mean-patch embeddings; optionally the full normalised
        features and the cls-to-patch attention of class-attention layer ``attention_layer``."""
        model = self.model
        if not isinstance(model, XCiT) or not len(model.cls_attn_blocks):
            raise ValueError(f"expected an XCiT classifier with class-attention blocks, got {type(model).__name__}; "
                             "use forward_tokens for trunks")
        n_cls = len(model.cls_attn_blocks)
        if attention_layer is not None:
            if not -n_cls <= attention_layer < n_cls:
                raise ValueError(f"expected attention_layer in [{-n_cls}, {n_cls - 1}], got {attention_layer}")
            attention_layer %= n_cls
        tokens, hp, wp = self.forward_tokens(x)
        b = tokens.shape[0]
        cls = model.cls_token.expand(b, -1, -1).float()
        attention = cls_self = None
        for i, block in enumerate(model.cls_attn_blocks):
            cls, probs = self._class_attention_block(block, cls, tokens, record=i == attention_layer)
            if probs is not None:
                cls_self, attention = probs[..., 0], probs[..., 1:].reshape(b, -1, hp, wp)
        return self._finish(cls, tokens, (hp, wp), features, attention, cls_self)

    # ----- stem and positional encoding --------------------------------------------------------
    def _embed(self, image: _ImageRows) -> tuple[torch.Tensor, int, int]:
        """Patch tokens with positional encoding (B, N, C) fp32, computed in row tiles."""
        heights, widths = [image.height], [image.width]
        for conv, _, _ in self.stages:
            heights.append(_out_size(heights[-1], conv, 0))
            widths.append(_out_size(widths[-1], conv, 1))
        hp, wp = heights[-1], widths[-1]
        model = self.model
        tokens = torch.empty(image.batch, hp * wp, model.embed_dim, device=image.device)
        rows = self._rows_per_tile(wp)
        for r0 in range(0, hp, rows):
            r1 = min(r0 + rows, hp)
            t = self._stem_rows(image, heights, len(self.stages) - 1, r0, r1)
            t = t.flatten(2).transpose(1, 2)
            if model.pos_embeder is not None:
                t = t + _fourier_rows(model.pos_embeder, r0, r1, hp, wp).to(t.dtype)
            tokens[:, r0 * wp:r1 * wp] = t
        return tokens, hp, wp

    def _stem_rows(self, image: _ImageRows, heights: list[int], i: int, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of stem stage ``i``'s output (after its activation), from the rows they need."""
        conv, bn, act = self.stages[i]
        lo, hi = _input_rows(conv, r0, r1, heights[i])
        x = image.rows(lo, hi) if i == 0 else self._stem_rows(image, heights, i - 1, lo, hi)
        x = bn(_conv_rows(conv, x, lo, r0, r1, heights[i]))
        return x if act is None else act(x)

    # ----- XCA blocks --------------------------------------------------------------------------
    def _xca_block(self, block: nn.Module, x: torch.Tensor, hp: int, wp: int) -> None:
        """Replace ``x`` by ``block(x, hp, wp)``, in place."""
        attn = self._channel_attention(block, x)
        self._apply_block(block, x, hp, wp, attn)

    def _channel_attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pass 1: the (B, h, d, d) XCA softmax from the Gram matrix and q / k norms over all tokens."""
        xca = block.attn
        b, n, c = x.shape
        h = xca.num_heads
        d = c // h
        weight, bias = xca.qkv.weight[: 2 * c], _slice(xca.qkv.bias, 0, 2 * c)
        gram = x.new_zeros(b, h, d, d, dtype=torch.float32)
        q_sq = x.new_zeros(b, h, d, dtype=torch.float32)
        k_sq = torch.zeros_like(q_sq)
        for s in range(0, n, self.tokens_per_chunk):
            chunk = x[:, s:s + self.tokens_per_chunk]
            qk = F.linear(block.norm1(chunk), weight, bias)
            with _no_autocast(x):
                qk = qk.float().reshape(b, -1, 2, h, d).permute(2, 0, 3, 4, 1)  # (2, B, h, d, n)
                q, k = qk[0], qk[1]
                gram.add_(q @ k.transpose(-2, -1))
                q_sq.add_(q.square().sum(-1))
                k_sq.add_(k.square().sum(-1))
        with _no_autocast(x):
            q_norm = q_sq.sqrt().clamp_min(NORM_EPS)
            k_norm = k_sq.sqrt().clamp_min(NORM_EPS)
            logits = gram / q_norm[..., :, None] / k_norm[..., None, :] * xca.temperature.float()
            return logits.softmax(dim=-1)

    def _apply_block(self, block: nn.Module, x: torch.Tensor, hp: int, wp: int, attn: torch.Tensor) -> None:
        """Pass 2, in row tiles: attention residual, LPI (with halo), MLP residual; written into ``x``.

        The LPI of rows [r0, r1) needs the post-attention tokens of rows [r0 - above, r1 + below).
        Those below are computed ahead from the not yet overwritten input; those above were computed
        by the previous tile and are kept (``ahead``), since ``x`` already holds their block output.
        """
        above, below = _halo(block.local_mp.conv1), _halo(block.local_mp.conv2)
        above, below = above[0] + below[0], above[1] + below[1]
        rows = self._rows_per_tile(wp)
        ahead, ahead_start, done = None, 0, 0  # ``ahead`` holds attention-updated rows [ahead_start, done)
        for r0 in range(0, hp, rows):
            r1 = min(r0 + rows, hp)
            end = min(r1 + below, hp)
            if end > done:
                new = self._attention_residual(block, x[:, done * wp:end * wp], attn)
                ahead = new if ahead is None else torch.cat([ahead, new], dim=1)
            start = max(r0 - above, 0)
            ahead, ahead_start, done = ahead[:, (start - ahead_start) * wp:], start, end
            tile = ahead[:, (r0 - start) * wp:(r1 - start) * wp]
            tile = tile + block.gamma3 * self._lpi_rows(block, ahead, start, end, r0, r1, hp, wp)
            tile = tile + block.gamma2 * block.mlp(block.norm2(tile))
            x[:, r0 * wp:r1 * wp] = tile

    def _attention_residual(self, block: nn.Module, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x + gamma1 * proj(attn @ v)`` for a run of tokens, v computed from them."""
        xca = block.attn
        b, n, c = x.shape
        h = xca.num_heads
        v = F.linear(block.norm1(x), xca.qkv.weight[2 * c:], _slice(xca.qkv.bias, 2 * c, 3 * c))
        v = v.reshape(b, n, h, c // h).permute(0, 2, 3, 1)  # (B, h, d, n)
        y = (attn.to(v.dtype) @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return x + block.gamma1 * xca.proj(y)

    def _lpi_rows(self, block: nn.Module, ahead: torch.Tensor, start: int, end: int,
                  r0: int, r1: int, hp: int, wp: int) -> torch.Tensor:
        """LPI output (B, n, C) of rows [r0, r1) from norm3 of the post-attention rows [start, end)."""
        lpi = block.local_mp
        b, _, c = ahead.shape
        z = block.norm3(ahead).transpose(1, 2).reshape(b, c, end - start, wp)
        lo, hi = _input_rows(lpi.conv2, r0, r1, hp)
        z = lpi.bn(lpi.act(_conv_rows(lpi.conv1, z, start, lo, hi, hp)))
        z = _conv_rows(lpi.conv2, z, lo, r0, r1, hp)
        return z.reshape(b, c, -1).transpose(1, 2)

    # ----- class attention and the head ----------------------------------------------------------
    def _class_attention_block(
        self, block: nn.Module, cls: torch.Tensor, x: torch.Tensor, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One class-attention block: the new cls token (B, 1, C); patch tokens ``x`` updated in place.

        The softmax over [cls, patches] runs online: a running maximum ``m``, the sum ``s`` of
        ``exp(logit - m)`` and the weighted sum of values, rescaled when the maximum grows. With
        ``record``, also the (B, h, 1 + N) softmax weights (their logits are kept, 4 bytes a token).
        """
        ca = block.attn
        b, n, c = x.shape
        h = ca.num_heads
        d = c // h
        w, bias = ca.qkv.weight, ca.qkv.bias

        def keys_values(xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kv = F.linear(xn, w[c:], _slice(bias, c, 3 * c)).reshape(b, -1, 2, h, d).permute(2, 0, 3, 1, 4)
            return kv[0].float(), kv[1].float()  # (B, h, n, d) each

        cls_n = block.norm1(cls)
        q = F.linear(cls_n, w[:c], _slice(bias, 0, c)).reshape(b, h, 1, d).float()
        with _no_autocast(x):
            k, v = keys_values(cls_n)
            m = (q * k).sum(-1) * ca.scale  # (B, h, 1): the cls token's own logit
            saved = [m] if record else None
            s = torch.ones_like(m)
            acc = v  # (B, h, 1, d)
        for start in range(0, n, self.tokens_per_chunk):
            chunk = x[:, start:start + self.tokens_per_chunk]
            xn = block.norm1(chunk)
            k, v = keys_values(xn)
            with _no_autocast(x):
                logits = (q * k).sum(-1) * ca.scale  # (B, h, n)
                m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
                p = (logits - m_new).exp()
                rescale = (m - m_new).exp()
                s = s * rescale + p.sum(-1, keepdim=True)
                acc = acc * rescale[..., None] + p[:, :, None] @ v
                m = m_new
            if record:
                saved.append(logits)
            patches = chunk + block.gamma1 * xn
            if block.tokens_norm:
                patches = block.norm2(patches)
            x[:, start:start + self.tokens_per_chunk] = 2 * patches
        out = (acc / s[..., None]).reshape(b, 1, c).to(cls.dtype)
        cls = cls + block.gamma1 * ca.proj(out)
        cls = block.norm2(cls)
        cls = (cls + block.gamma2 * block.mlp(cls)).float()
        probs = None
        if record:
            probs = (torch.cat(saved, dim=-1) - m).exp_().div_(s)
        return cls, probs

    def _finish(self, cls, tokens, grid, features: bool, attention, cls_self) -> StreamOutput:
        """Final norm, mean patch embedding, head (and the full features on request)."""
        model = self.model
        b, n, c = tokens.shape
        cls_feat = model.norm(cls)
        out = torch.empty(b, 1 + n, c, dtype=cls_feat.dtype, device=tokens.device) if features else None
        total = tokens.new_zeros(b, c, dtype=torch.float32)
        for s in range(0, n, self.tokens_per_chunk):
            normed = model.norm(tokens[:, s:s + self.tokens_per_chunk])
            total += normed.float().sum(1)
            if out is not None:
                out[:, 1 + s:1 + s + normed.shape[1]] = normed
        if out is not None:
            out[:, :1] = cls_feat
        return StreamOutput(
            cls=cls_feat[:, 0], mean_patch=total / n, logits=model.forward_head(cls_feat), grid=grid,
            features=out, attention=attention, cls_self=cls_self,
        )

    def _rows_per_tile(self, wp: int) -> int:
        return max(1, self.tokens_per_chunk // wp)

    def extra_repr(self) -> str:
        return f"tokens_per_chunk={self.tokens_per_chunk}"


# ----- input rows ------------------------------------------------------------------------------
class _ImageRows:
    """Rows of an input image batch as float (B, C, rows, W) tensors on ``device``, normalised per tile if uint8.

    Besides tensors and numpy arrays, any lazy array with ``shape``, ``dtype`` and numpy slicing (a memory map, an
    :class:`xcit.data.slides.SlideLevel`) is read a row band at a time. ``pad_to`` (H', W') appends zero rows and
    columns after normalisation, as a detector's batching pads its input."""

    def __init__(self, x, in_chans: int, mean: torch.Tensor | None, std: torch.Tensor | None,
                 device: torch.device, pad_to: tuple[int, int] | None = None) -> None:
        expected = (f"a float or uint8 tensor / numpy array of shape (B, {in_chans}, H, W), or one uint8 "
                    f"(H, W, {in_chans}) numpy array")
        self.channels_last = False
        if isinstance(x, torch.Tensor):
            if x.ndim != 4:
                raise ValueError(f"expected {expected}, got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
            if x.dtype != torch.uint8 and not x.is_floating_point():
                raise ValueError(f"expected {expected}, got dtype {x.dtype}")
            self.is_uint8 = x.dtype == torch.uint8
        elif isinstance(x, np.ndarray) or _is_lazy_array(x):
            if x.ndim == 3:
                self.channels_last = True
            elif x.ndim != 4:
                raise ValueError(f"expected {expected}, got a {x.ndim}-d array of shape {x.shape}")
            dtype = np.dtype(x.dtype)
            if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
                raise ValueError(f"expected {expected}, got dtype {dtype}")
            self.is_uint8 = dtype == np.uint8
        else:
            raise ValueError(f"expected {expected}, got {type(x).__name__}")
        shape = (1, x.shape[2], x.shape[0], x.shape[1]) if self.channels_last else tuple(x.shape)
        self.batch, c, self.image_height, self.image_width = shape
        self.channels = c
        if c != in_chans:
            raise ValueError(f"expected {expected}, got {c} channels (shape {tuple(x.shape)})")
        if min(shape) < 1:
            raise ValueError(f"expected {expected} with B, H, W >= 1, got shape {tuple(x.shape)}")
        if self.is_uint8 and (mean is None or std is None):
            raise ValueError("uint8 input is normalised tile by tile: pass mean and std to xcit.streaming")
        self.height, self.width = pad_to or (self.image_height, self.image_width)
        if self.height < self.image_height or self.width < self.image_width:
            raise ValueError(f"expected pad_to >= the image size {(self.image_height, self.image_width)}, got {pad_to}")
        self.x, self.device = x, device
        self.mean = None if mean is None else mean.to(device)
        self.std = None if std is None else std.to(device)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        real = min(hi, self.image_height)
        if real <= lo:
            return torch.zeros(self.batch, self.channels, hi - lo, self.width, device=self.device)
        t = self._read(lo, real)
        if (hi, self.width) == (real, self.image_width):
            return t
        return F.pad(t, (0, self.width - self.image_width, 0, hi - real))

    def _read(self, lo: int, hi: int) -> torch.Tensor:
        if self.channels_last:
            t = torch.from_numpy(np.array(self.x[lo:hi])).permute(2, 0, 1)[None]
        elif not isinstance(self.x, torch.Tensor):
            t = torch.from_numpy(np.array(self.x[:, :, lo:hi]))
        else:
            t = self.x[:, :, lo:hi]
        if not self.is_uint8:
            return t.to(self.device)
        t = t.to(self.device).float().div(255)
        return (t - self.mean).div(self.std)


def _is_lazy_array(x) -> bool:
    """An object read like a numpy array (``shape``, ``dtype``, ``ndim``, slicing) without being one."""
    return all(hasattr(x, a) for a in ("shape", "dtype", "ndim", "__getitem__"))


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` of a uint8 (B, C, H, W) batch: what the streaming forward does per tile."""
    c = x.shape[1]
    return (x.float().div(255) - _per_channel(mean, c, "mean")).div(_per_channel(std, c, "std"))


# ----- helpers -----------------------------------------------------------------------------------
def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise RuntimeError(
            "the streaming forward is for inference only (BatchNorm running statistics, no dropout): "
            "call model.eval() first"
        )


def _per_channel(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != channels:
        raise ValueError(f"expected {channels} {name} values (one per input channel), got {list(values)}")
    return t.view(1, channels, 1, 1)


def _stem_stages(proj: nn.Sequential) -> list[tuple[nn.Conv2d, nn.Module, nn.Module | None]]:
    """(conv, norm, activation after the stage or None) for each stage of the convolutional stem."""
    stages: list = []
    for m in proj:
        if isinstance(m, nn.Sequential):
            conv, norm = m[0], m[1]
            if not isinstance(conv, nn.Conv2d) or len(m) != 2:
                raise ValueError(f"expected stem stages Sequential(Conv2d, norm), got {m}")
            stages.append([conv, norm, None])
        elif stages and stages[-1][2] is None:
            stages[-1][2] = m
        else:
            raise ValueError(f"unexpected stem layer {m}")
    return [tuple(s) for s in stages]


def _out_size(size: int, conv: nn.Conv2d, dim: int) -> int:
    k, s, p, dil = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    return (size + 2 * p - dil * (k - 1) - 1) // s + 1


def _halo(conv: nn.Conv2d) -> tuple[int, int]:
    """Rows above and below an output row that a stride-1 convolution reads."""
    reach = conv.dilation[0] * (conv.kernel_size[0] - 1)
    return conv.padding[0], reach - conv.padding[0]


def _input_rows(conv: nn.Conv2d, r0: int, r1: int, height: int) -> tuple[int, int]:
    """The rows [lo, hi) of an input of ``height`` rows that output rows [r0, r1) read (inside the image)."""
    a, b = _padded_rows(conv, r0, r1)
    return max(a, 0), min(b, height)


def _padded_rows(conv: nn.Conv2d, r0: int, r1: int) -> tuple[int, int]:
    s, p = conv.stride[0], conv.padding[0]
    return r0 * s - p, (r1 - 1) * s - p + conv.dilation[0] * (conv.kernel_size[0] - 1) + 1


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, x_start: int, r0: int, r1: int, height: int) -> torch.Tensor:
    """Output rows [r0, r1) of ``conv`` on a map of ``height`` rows, of which ``x`` holds rows from
    ``x_start``: the rows read are sliced out and the ones outside the map zero-padded, as ``conv``'s
    own padding would."""
    a, b = _padded_rows(conv, r0, r1)
    lo, hi = max(a, 0), min(b, height)
    if lo < x_start or hi > x_start + x.shape[-2]:
        raise AssertionError(f"rows [{lo}, {hi}) needed, [{x_start}, {x_start + x.shape[-2]}) available")
    x = F.pad(x[:, :, lo - x_start:hi - x_start], (0, 0, lo - a, b - hi))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


def _fourier_rows(pe: nn.Module, r0: int, r1: int, hp: int, wp: int) -> torch.Tensor:
    """Rows [r0, r1) of ``pe(hp, wp)`` (the Fourier positional encoding), as (1, (r1 - r0) * wp, C)."""
    device = pe.token_projection.weight.device
    rows = torch.arange(r0 + 1, r1 + 1, dtype=torch.float32, device=device)
    cols = torch.arange(1, wp + 1, dtype=torch.float32, device=device)
    y = (rows / (hp + pe.eps) * pe.scale)[:, None].expand(r1 - r0, wp)
    x = (cols / (wp + pe.eps) * pe.scale)[None, :].expand(r1 - r0, wp)
    dim_t = torch.arange(pe.hidden_dim, dtype=torch.float32, device=device)
    dim_t = pe.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / pe.hidden_dim)

    def axis(positions: torch.Tensor) -> torch.Tensor:
        pos = positions[..., None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    pos = torch.cat((axis(y), axis(x)), dim=-1).permute(2, 0, 1).unsqueeze(0)
    weight = pe.token_projection.weight
    return pe.token_projection(pos.to(weight.dtype)).flatten(2).transpose(1, 2)


def _slice(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if bias is None else bias[start:stop]


def _no_autocast(x: torch.Tensor):
    """Accumulate statistics in fp32 even under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)
