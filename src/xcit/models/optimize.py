"""The inference transform: ``optimize(model)`` returns a faster copy of an XCiT for inference only.

The model that :func:`xcit.create_model` returns is an ordinary ``nn.Module`` (hooks, LoRA,
quantisation, FX, export and training all see every layer). This transform is the one place where
speed is allowed to bypass modules. It deep-copies the model and replaces the stem, the XCA blocks
and the class-attention blocks with inference modules holding folded weights (computed in
float64, exact algebra; fp32 results match the plain model to rounding):

* stem: each ``Conv2d(bias=False) -> BatchNorm2d`` becomes one convolution with bias,
  w' = w * s, b' = t with s = gamma / sqrt(var + eps), t = beta - mean * s, GELU fused in;
* XCA block: ``norm1``'s affine into ``attn.qkv`` (W' = W diag(g), b' = b + W beta), ``gamma1``
  into ``attn.proj`` (rows scaled), ``norm2``'s affine into ``mlp.fc1``, ``gamma2`` into ``mlp.fc2``;
  XCA folds its d x d attention into the value and output projections when tokens outnumber
  channels (``fold``);
* LPI: the BatchNorm and ``gamma3`` into ``conv2`` (depthwise): w' = gamma3 s w,
  b' = gamma3 (b + t sum(w)); the BN shift does not pass through zero padding, so the missing
  taps' share ``gamma3 t w[i, j]`` is subtracted on the border rows and columns;
* class attention from the cls query alone (keys and values of the patches never materialised);
* residual additions and GELUs fused into the products (oneDNN post-ops on CPU, ``dnn``);
* the stem per group of images in eager execution when its first-stage map is large
  (:data:`STEM_CHUNK_BYTES`).

Not folded: ``norm3`` (its shift would need border terms before the GELU), the class-attention
blocks' norms (their norm1 output is also added to the residual) and the final norm.

The result is inference-only (its parameters are frozen; training mode raises), works under bf16
autocast, and still exports: under tracing, ``torch.export``, both ONNX exporters and
``torch.compile`` every kernel uses ``aten`` operations only (:mod:`xcit.models.kernels`).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from . import kernels as K
from .layers import LPI, ClassAttentionBlock, ConvPatchEmbed, XCABlock, map_to_tokens, tokens_to_map

__all__ = ["optimize", "is_optimized", "OptimizedPatchEmbed", "OptimizedXCABlock", "OptimizedClassAttentionBlock"]


DTYPES = (torch.float32, torch.bfloat16)

#: Largest first-stage stem map (bytes) one group of images makes in eager execution. glibc serves
#: allocations above its mmap ceiling (32 MiB on 64-bit Linux) with fresh pages and returns them when
#: freed, so a larger map is faulted in page by page on every call (38.5 MB in fp32 at 224 px batch 16:
#: 9.4 thousand faults, a third of the first convolution's time); the stem runs per group of images
#: instead, or one image per band of rows, which is exact (every output row is convolved on its own).
STEM_CHUNK_BYTES = 32 * 2**20


class _InferenceOnly(nn.Module):
    """Base of the optimised modules: holds the kernel options and refuses training mode.

    ``dtype`` is what the products run in. bf16 stores the product weights in bf16 (pre-packed for
    oneDNN on first eager use) and runs the block under bf16 autocast whether or not the caller
    asked for it: norms and softmax accumulate in float32 (XCA's token-axis norms are then rounded to bf16,
    as ``F.normalize`` does under autocast); the tokens between the XCA blocks are bf16 (the
    stem writes them in bf16), the class-attention blocks and the logits float32.
    """

    def __init__(self, fold: str, dnn: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fold = fold
        self.dnn = dnn
        self.dtype = dtype
        self.packed = K.PackedWeights() if dtype == torch.bfloat16 else None

    def _weight_dtype(self, original: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.dtype == torch.bfloat16 else original

    def _precision(self, x: torch.Tensor):
        """The block's compute precision: bf16 autocast for a bf16 model, else the caller's own setting."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_eval(self) -> None:
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} is part of an inference model (xcit.optimize); train the original model "
                "instead, or call .eval()"
            )

    def extra_repr(self) -> str:
        dtype = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"fold={self.fold!r}, dnn={self.dnn}{dtype}"


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with ``bn(x) == x * scale + shift`` per channel, for an eval-mode BatchNorm."""
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
    b = lin.bias.double() if lin.bias is not None else w.new_zeros(w.shape[0])
    if norm.bias is not None:
        b = b + w @ norm.bias.double()
    if norm.weight is not None:
        w = w * norm.weight.double()[None, :]
    return w, b


def fold_scale_into_layer(gamma: torch.Tensor, layer: nn.Linear | nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (float64) of ``layer'(x) = gamma * layer(x)``, gamma per output channel (Linear or Conv2d)."""
    g = gamma.double()
    b = layer.bias.double() * g if layer.bias is not None else torch.zeros_like(g)
    return layer.weight.double() * g.reshape(-1, *[1] * (layer.weight.dim() - 1)), b


def _require_module(module: nn.Module, kind: type, what: str) -> None:
    if type(module) is not kind:
        raise ValueError(
            f"cannot optimise {what}: expected {kind.__name__}, found {type(module).__name__} (a replaced or wrapped "
            "module, e.g. LoRA or quantisation); merge or remove the replacement first, or use the plain model"
        )


class OptimizedPatchEmbed(_InferenceOnly):
    """The convolutional stem with each BatchNorm folded into its convolution, GELU fused, channels-last."""

    def __init__(self, embed: ConvPatchEmbed, fold: str = "auto", dnn: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(fold, dnn, dtype)
        self.patch_size = embed.patch_size
        stages = [m for m in embed.proj if isinstance(m, nn.Sequential)]
        self.num_stages = len(stages)
        with torch.no_grad():
            for i, stage in enumerate(stages):
                conv, bn = stage
                _require_module(conv, nn.Conv2d, f"stem stage {i}")
                _require_module(bn, nn.BatchNorm2d, f"stem stage {i}")
                s, t = bn_scale_shift(bn)
                w = conv.weight.double() * s[:, None, None, None]
                b = t if conv.bias is None else t + s * conv.bias.double()
                dtype = self._weight_dtype(conv.weight.dtype)
                self.register_buffer(f"weight{i}", w.to(dtype).contiguous(memory_format=torch.channels_last))
                self.register_buffer(f"bias{i}", b.to(dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        self._check_eval()
        if self.dtype == torch.bfloat16 and x.dtype == torch.float32:
            x = x.to(torch.bfloat16)  # what the first convolution reads anyway; half the bytes to lay out
        groups, bands = self._split(x)
        if groups == 1 and bands == 1:
            return self._embed(x)
        parts = [self._embed(part, bands) for part in x.tensor_split(groups)]
        tokens = parts[0][0] if groups == 1 else torch.cat([tokens for tokens, _, _ in parts])
        return tokens, parts[0][1], parts[0][2]

    def _split(self, x: torch.Tensor) -> tuple[int, int]:
        """(groups of images, bands of rows per image) the stem runs in, eagerly: each piece's first-stage
        map within :data:`STEM_CHUNK_BYTES`; rows are split only when one image's map is larger. One piece
        under graph capture, where sizes may be symbolic."""
        if K.graph_capture() or x.dim() != 4 or x.shape[0] == 0:
            return 1, 1
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        weight = self.weight0
        per_image = weight.shape[0] * -(-height // 2) * -(-width // 2) * weight.element_size()
        if per_image <= STEM_CHUNK_BYTES:
            return max(1, min(batch, -(-per_image * batch // STEM_CHUNK_BYTES))), 1
        return batch, max(1, min(self._sizes(height)[-1], -(-per_image // STEM_CHUNK_BYTES)))

    def _sizes(self, n: int) -> list[int]:
        """A side of ``n`` pixels after each stride-2 stage of the stem: [n, ceil(n / 2), ...]."""
        sizes = [n]
        for _ in range(self.num_stages):
            sizes.append(-(-sizes[-1] // 2))
        return sizes

    def _embed(self, x: torch.Tensor, bands: int = 1) -> tuple[torch.Tensor, int, int]:
        """Tokens of images ``x``; with ``bands`` > 1 (one image) band by band of output rows."""
        x = x.contiguous(memory_format=torch.channels_last)
        with self._precision(x):
            if bands == 1:
                x = self._stages(x)
                return map_to_tokens(x), x.shape[-2], x.shape[-1]
            heights = self._sizes(x.shape[-2])
            rows = heights[-1]
            pieces = []
            for i in range(bands):
                needed = [(i * rows // bands, (i + 1) * rows // bands)]  # rows [a, b) of each stage, last stage first
                for height in reversed(heights[:-1]):
                    a, b = needed[-1]
                    needed.append((max(0, 2 * a - 2), min(height, 2 * b)))
                needed.reverse()
                lo, hi = needed[0]
                pieces.append(map_to_tokens(self._stages(x[:, :, lo:hi], needed)))
        return torch.cat(pieces, dim=1), rows, self._sizes(x.shape[-1])[-1]

    def _stages(self, x: torch.Tensor, needed: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """The stem's convolutions (stride 2, zero padding 1) on input rows ``needed[0]`` = [lo, hi), keeping
        output rows ``needed[i + 1]`` of stage i. Output row j of a band starting at an even row lo is row
        lo / 2 + j of the whole map; a band that starts below the top (lo > 0) also makes row lo / 2, which
        read the zero padding above the band and is dropped. ``None``: the whole map."""
        for i in range(self.num_stages):
            x = K.conv2d(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), 2, 1, 1,
                         gelu=i < self.num_stages - 1, dnn=self.dnn)
            if needed is not None:
                (lo, _), (a, b) = needed[i], needed[i + 1]
                x = x[:, :, a - lo // 2: b - lo // 2]
        return x


class OptimizedXCABlock(_InferenceOnly):
    """An XCA block with LayerScale, LayerNorm and BatchNorm affines folded, residuals fused."""

    def __init__(self, block: XCABlock, fold: str = "auto", dnn: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(fold, dnn, dtype)
        attn, lpi, mlp = block.attn, block.local_mp, block.mlp
        for name, module, kind in (
            ("attn.qkv", attn.qkv, nn.Linear), ("attn.proj", attn.proj, nn.Linear), ("mlp.fc1", mlp.fc1, nn.Linear),
            ("mlp.fc2", mlp.fc2, nn.Linear), ("norm1", block.norm1, nn.LayerNorm), ("norm2", block.norm2, nn.LayerNorm),
            ("local_mp", lpi, LPI), ("local_mp.conv1", lpi.conv1, nn.Conv2d), ("local_mp.bn", lpi.bn, nn.BatchNorm2d),
            ("local_mp.conv2", lpi.conv2, nn.Conv2d),
        ):
            _require_module(module, kind, f"XCA block {name}")
        if lpi.conv2.groups != lpi.conv2.in_channels:
            raise ValueError("LPI conv2 must be depthwise to fold its BatchNorm")
        self.num_heads = attn.num_heads
        # the norms' own (constant) shapes: a traced x.shape[-1] would be a graph value to ONNX's layer_norm
        self.dim = tuple(block.norm1.normalized_shape)
        self.norm1_eps, self.norm2_eps = block.norm1.eps, block.norm2.eps
        self.norm3 = copy.deepcopy(block.norm3)
        self.conv1 = copy.deepcopy(lpi.conv1).to(self._weight_dtype(lpi.conv1.weight.dtype))
        self.padding = lpi.conv2.padding[0]
        dtype = self._weight_dtype(attn.qkv.weight.dtype)
        with torch.no_grad():
            folded = {
                "qkv": _fold_norm_into_linear(block.norm1, attn.qkv),
                "proj": fold_scale_into_layer(block.gamma1, attn.proj),
                "fc1": _fold_norm_into_linear(block.norm2, mlp.fc1),
                "fc2": fold_scale_into_layer(block.gamma2, mlp.fc2),
            }
            for name, (w, b) in folded.items():
                self.register_buffer(f"{name}_weight", w.to(dtype))
                self.register_buffer(f"{name}_bias", b.to(dtype))
            self.register_buffer("temperature", attn.temperature.detach().clone())
            # the norms' unit weight and zero bias (their affine is in qkv / fc1): PyTorch's fast LayerNorm kernel
            self.register_buffer("norm_unit", torch.ones(self.dim, dtype=attn.qkv.weight.dtype), persistent=False)
            self.register_buffer("norm_zero", torch.zeros(self.dim, dtype=attn.qkv.weight.dtype), persistent=False)
            s, t = bn_scale_shift(lpi.bn)
            g = block.gamma3.double()
            w = lpi.conv2.weight.double()  # (C, 1, K, K), depthwise
            b = lpi.conv2.bias.double() if lpi.conv2.bias is not None else torch.zeros_like(g)
            self.register_buffer("conv2_weight", (w * (g * s)[:, None, None, None]).to(dtype))
            self.register_buffer("conv2_bias", (g * (b + t * w.sum(dim=(1, 2, 3)))).to(dtype))
            sides, corners = K.border_sums((g * t)[:, None, None] * w[:, 0], self.padding)
            self.register_buffer("border_sides", sides.to(dtype))
            self.register_buffer("border_corners", corners.to(dtype))

    def forward(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        self._check_eval()
        with self._precision(x):
            x = K.xca(self._norm(x, self.norm1_eps), self.qkv_weight, self.qkv_bias,
                      self.proj_weight, self.proj_bias, self.temperature, self.num_heads, residual=x, fold=self.fold,
                      dnn=self.dnn, packed=self.packed)
            x = self._lpi(x, hp, wp)
            h = K.linear(self._norm(x, self.norm2_eps), self.fc1_weight,
                         self.fc1_bias, gelu=True, dnn=self.dnn, packed=self.packed)
            return K.linear_add(h, self.fc2_weight, self.fc2_bias, x, dnn=self.dnn, packed=self.packed)

    def _norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return K.plain_layer_norm(x, self.dim, self.norm_unit, self.norm_zero, eps)

    def _lpi(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """x + gamma3 * LPI(norm3(x)), with BN and gamma3 in conv2 and the residual fused into it."""
        c1 = self.conv1
        z = K.conv2d(tokens_to_map(self.norm3(x), hp, wp), c1.weight, c1.bias, 1, c1.padding[0], c1.groups,
                     gelu=True, dnn=self.dnn)
        y = K.conv2d_add(z, self.conv2_weight, self.conv2_bias, self.padding, self.conv2_weight.shape[0],
                         tokens_to_map(x, hp, wp), dnn=self.dnn)
        K.subtract_border_sums(y, self.border_sides, self.border_corners)
        return map_to_tokens(y)


class OptimizedClassAttentionBlock(_InferenceOnly):
    """A class-attention block computing the cls query alone; patch tokens updated elementwise."""

    def __init__(self, block: ClassAttentionBlock, fold: str = "auto", dnn: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(fold, dnn, dtype)
        for name, module, kind in (
            ("attn.qkv", block.attn.qkv, nn.Linear), ("attn.proj", block.attn.proj, nn.Linear),
            ("norm1", block.norm1, nn.LayerNorm), ("norm2", block.norm2, nn.LayerNorm),
            ("mlp.fc1", block.mlp.fc1, nn.Linear), ("mlp.fc2", block.mlp.fc2, nn.Linear),
        ):
            _require_module(module, kind, f"class-attention block {name}")
        self.norm1 = copy.deepcopy(block.norm1)
        self.norm2 = copy.deepcopy(block.norm2)
        self.num_heads = block.attn.num_heads
        self.scale = block.attn.scale
        self.tokens_norm = block.tokens_norm
        with torch.no_grad():
            for name, lin in (("qkv", block.attn.qkv), ("proj", block.attn.proj), ("fc1", block.mlp.fc1),
                              ("fc2", block.mlp.fc2)):
                dtype = self._weight_dtype(lin.weight.dtype)
                self.register_buffer(f"{name}_weight", lin.weight.detach().to(dtype, copy=True))
                self.register_buffer(f"{name}_bias", None if lin.bias is None else lin.bias.detach().to(dtype, copy=True))
            self.register_buffer("gamma1", block.gamma1.detach().clone())
            self.register_buffer("gamma2", block.gamma2.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_eval()
        with self._precision(x):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official arithmetic, cls token and patch tokens apart:
        # cls -> norm2(x_c + g1 * attn_c) + g2 * mlp(.), patches -> norm2?(x_p + g1 * norm1(x)_p) * 2.
        xn = self.norm1(x)
        attn = K.class_attention(xn, self.qkv_weight, self.qkv_bias, self.proj_weight, self.proj_bias,
                                 self.num_heads, self.scale, dnn=self.dnn, packed=self.packed)
        cls = self.norm2(torch.addcmul(x[:, :1], attn, self.gamma1))
        patches = torch.addcmul(x[:, 1:], xn[:, 1:], self.gamma1)
        if self.tokens_norm:
            patches = self.norm2(patches)
        hidden = K.linear(cls, self.fc1_weight, self.fc1_bias, gelu=True, dnn=self.dnn, packed=self.packed)
        cls = torch.addcmul(cls, K.linear(hidden, self.fc2_weight, self.fc2_bias, dnn=self.dnn, packed=self.packed),
                            self.gamma2)
        return torch.cat([cls, patches * 2], dim=1)


def optimize(model: nn.Module, *, fold: str = "auto", dnn: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An inference-only copy of ``model`` (an XCiT classifier, pyramid or trunk) with folded weights.

    Args:
        model: an XCiT built by this package; it is not modified.
        fold: XCA attention folding into the projections: ``"auto"`` (when tokens outnumber
            channels), ``"always"`` or ``"never"``.
        dnn: run fp32 CPU products through oneDNN's fused kernels in eager execution (on CPUs
            whose BLAS is slow in fp32 this is about twice as fast; elsewhere about even).
        dtype: what the products run in. ``torch.float32`` (default; bf16 autocast around the call
            still works); ``torch.bfloat16``: the weights of the products stored in bf16 and, in
            eager CPU execution, pre-packed for oneDNN; the blocks run under bf16 autocast without
            the caller setting it (float32 in and out; norms and softmax accumulated in float32, the patch tokens
            between the XCA blocks in bf16).
            The fastest CPU path where the CPU has bf16 instructions (AVX512-BF16, AMX).

    Returns a new model in eval mode with frozen weights; its forward raises in training mode.
    Options live on the returned model's modules: two optimised models with different options run
    side by side (threads included).
    """
    if fold not in K.FOLD_CHOICES:
        raise ValueError(f"fold must be one of {K.FOLD_CHOICES}, got {fold!r}")
    if not isinstance(dnn, bool):
        raise ValueError(f"dnn must be True or False, got {dnn!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype!r}")
    if is_optimized(model):
        raise ValueError("the model is already optimised (xcit.optimize returns a new model; optimise the original)")
    if not any(isinstance(m, (ConvPatchEmbed, XCABlock)) for m in model.modules()):
        raise ValueError(f"expected an XCiT model (with a ConvPatchEmbed stem and XCA blocks), got {type(model).__name__}")
    out = copy.deepcopy(model).eval()
    _replace(out, fold, dnn, dtype)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _replace(module: nn.Module, fold: str, dnn: bool, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if type(child) is ConvPatchEmbed:
            setattr(module, name, OptimizedPatchEmbed(child, fold, dnn, dtype))
        elif type(child) is XCABlock:
            setattr(module, name, OptimizedXCABlock(child, fold, dnn, dtype))
        elif type(child) is ClassAttentionBlock:
            setattr(module, name, OptimizedClassAttentionBlock(child, fold, dnn, dtype))
        else:
            _replace(child, fold, dnn, dtype)


def is_optimized(model: nn.Module) -> bool:
    """Whether ``model`` contains modules of the inference transform."""
    return any(isinstance(m, _InferenceOnly) for m in model.modules())
