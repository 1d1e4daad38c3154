"""The XCiT classifier and its dense-prediction pyramid, built on one shared trunk."""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernels import autocast_enabled
from .layers import LN_EPS, ClassAttentionBlock, ConvPatchEmbed, FourierPositionalEncoding, XCABlock


class XCiTTrunk(nn.Module):
    """Convolutional stem, Fourier positional encoding and the stack of XCA blocks.

    Shared by :class:`XCiT` (classification) and :class:`XCiTPyramid` (dense prediction), so the
    token computation is written once. Any input size >= 1 pixel runs; the grid is
    ceil(H / patch_size) x ceil(W / patch_size).
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        eta: float | None = None,
        use_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        eta = default_eta(depth) if eta is None else eta
        self.arch_config = dict(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, eta=eta, use_pos_embed=use_pos_embed,
        )
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = False
        # The evaluation preprocessing the weights expect, as a checkpoint's ``data`` entry records it (img_size,
        # in_chans, mean, std, crop_pct, interpolation; any may be missing): set by create_model, read by
        # xcit.data.resolve_data_config, written back by save_checkpoint. None: nothing recorded.
        self.data_config: dict | None = None

        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embeder = FourierPositionalEncoding(embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate)
        # The official recipe uses the same drop path rate in every XCA block.
        self.blocks = nn.ModuleList(
            XCABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, eta)
            for _ in range(depth)
        )

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def optimize(self, **options) -> nn.Module:
        """An inference copy of this model with folded weights and fused kernels (this model is unchanged).

        Same as :func:`xcit.optimize`; see :mod:`xcit.models.optimize` for ``options``.
        """
        from .optimize import optimize

        return optimize(self, **options)

    fuse = optimize  # the earlier spelling; it now returns a new model instead of changing this one

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute XCA blocks in the backward pass to save activation memory (same results)."""
        self.grad_checkpointing = enable

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the expectation if ``x`` is not a usable image batch."""
        expected = f"a float tensor of shape (B, {self.in_chans}, H, W) with B, H, W >= 1"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected {expected}, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected {expected}, got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected {expected}, got dtype {x.dtype}; convert images with x.float() / 255")
        dtype = self.dtype
        if x.dtype != dtype and not autocast_enabled(x.device.type):
            raise ValueError(
                f"expected input of the model's dtype {dtype}, got {x.dtype}; convert with x.to({dtype}), "
                f"cast the model (model.to({x.dtype})) or run under torch.autocast"
            )
        b, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"expected {expected}, got {c} channels (shape {tuple(x.shape)})")
        if b == 0:
            raise ValueError(f"expected {expected}, got an empty batch (shape {tuple(x.shape)})")
        if h < 1 or w < 1:
            raise ValueError(f"expected {expected}, got an image of {h}x{w} pixels")
        if self.training and b * _ceil_div(h, self.patch_size) * _ceil_div(w, self.patch_size) < 2:
            raise ValueError(
                "in training mode BatchNorm needs more than one value per channel: a batch of one "
                f"{h}x{w} image gives a single {self.patch_size}x{self.patch_size} patch; use a larger "
                "image or batch, or model.eval()"
            )

    @property
    @torch.jit.unused
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point weights: what inputs must have outside autocast."""
        tensors = (t for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point())
        return next(tensors, torch.empty(0)).dtype

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patch tokens (B, N, C) with positional encoding, and the grid size (Hp, Wp)."""
        if not torch.jit.is_scripting():
            if not _is_fx_tracing():  # under FX, shapes are proxies the checks cannot branch on
                self.check_input(x)
        x, hp, wp = self.patch_embed(x)
        if self.pos_embeder is not None:
            x = x + self.pos_embeder(hp, wp).to(x.dtype)
        return self.pos_drop(x), hp, wp

    def _run_block(self, block: XCABlock, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, hp, wp, use_reentrant=False, context_fn=_batchnorm_safe_recompute(block))
        return block(x, hp, wp)

    def forward_blocks(self, x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """Run all XCA blocks over (B, N, C) tokens of an ``hp`` x ``wp`` grid."""
        for block in self.blocks:
            if torch.jit.is_scripting():  # TorchScript: no gradient checkpointing
                x = block(x, hp, wp)
            else:
                x = self._run_block(block, x, hp, wp)
        return x

    def get_intermediate_layers(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Un-normalised outputs of the XCA blocks ``indices`` (negative counts from the end) as maps."""
        wanted = self._resolve_indices(indices)
        x, hp, wp = self.embed(x)
        maps = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = self._run_block(block, x, hp, wp)
            if i in wanted:
                maps[i] = x.transpose(1, 2).reshape(x.shape[0], -1, hp, wp)
        return [maps[i] for i in wanted]

    def _resolve_indices(self, indices: Sequence[int]) -> list[int]:
        if len(indices) == 0:
            raise ValueError("indices must name at least one XCA block")
        resolved = []
        for i in indices:
            j = i + self.depth if i < 0 else i
            if not 0 <= j < self.depth:
                raise ValueError(f"block index {i} out of range for a model with {self.depth} XCA blocks")
            resolved.append(j)
        return resolved

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class XCiT(XCiTTrunk):
    """Cross-Covariance Image Transformer classifier (El-Nouby et al., 2021).

    XCA blocks over patch tokens, then two class-attention blocks over [cls, patches], a final
    LayerNorm and a linear head on the cls token. Parameter names match the official release.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        eta: float | None = None,
        tokens_norm: bool = False,
        cls_attn_layers: int = 2,
        use_pos_embed: bool = True,
    ) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 for no head), got {num_classes}")
        super().__init__(
            patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
            drop_rate, attn_drop_rate, drop_path_rate, eta, use_pos_embed,
        )
        eta = default_eta(depth) if eta is None else eta
        self.arch_config.update(num_classes=num_classes, tokens_norm=tokens_norm, cls_attn_layers=cls_attn_layers)
        self.num_classes = num_classes
        self.tokens_norm = tokens_norm
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, eta, tokens_norm)
            for _ in range(cls_attn_layers)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: identity)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = self.arch_config["num_classes"] = num_classes
        ref = self.norm.weight
        self.head = nn.Linear(self.embed_dim, num_classes).to(ref.device, ref.dtype) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def _tokens_with_cls(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x, hp, wp = self.embed(x)
        x = self.forward_blocks(x, hp, wp)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1), hp, wp

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, 1 + N, C): the cls token first, then the patch tokens."""
        x, _, _ = self._tokens_with_cls(x)
        for block in self.cls_attn_blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classify from :meth:`forward_features` output; ``pre_logits`` returns the (B, C) cls feature."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def class_attention_maps(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """cls-to-patch attention of a class-attention layer as (B, heads, Hp, Wp); sums to <= 1 per head."""
        layer = range(len(self.cls_attn_blocks))[layer]
        x, hp, wp = self._tokens_with_cls(x)
        for i, block in enumerate(self.cls_attn_blocks):
            if i == layer:
                attn, _ = block.attn.attention(block.norm1(x))
                return attn[:, :, 1:].reshape(x.shape[0], self.num_heads, hp, wp)
            x = block(x)
        raise AssertionError("unreachable")


class XCiTPyramid(XCiTTrunk):
    """Dense-prediction backbone: XCA block outputs resampled to strides 4, 8, 16 and 32.

    Built as the official detection/segmentation backbones: no cls token, class attention or final
    norm; the outputs of ``out_indices`` ([3, 5, 7, 11] for depth 12, [7, 11, 15, 23] for depth 24)
    are upsampled with transposed convs (BN + GELU between two of them) or max-pooled. Returns an
    ``OrderedDict`` of maps keyed "0".."3" with ``out_channels`` channels each, the interface of
    torchvision's ``FeaturePyramidNetwork`` and ``BackboneWithFPN``.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, *, out_indices: Sequence[int] | None = None, **trunk_kwargs) -> None:
        super().__init__(**trunk_kwargs)
        if out_indices is None:
            out_indices = default_out_indices(self.depth)
        if len(out_indices) != 4:
            raise ValueError(f"out_indices must name 4 XCA blocks, got {list(out_indices)}")
        self.out_indices = self._resolve_indices(out_indices)
        self.out_channels = self.embed_dim
        self.in_channels_list = [self.embed_dim] * 4
        for level, stride in enumerate(self.strides, start=1):
            setattr(self, f"fpn{level}", _resample(self.embed_dim, self.patch_size, stride))
        self.apply(self._init_weights)

    @classmethod
    def from_classifier(cls, model: XCiT, out_indices: Sequence[int] | None = None, **overrides) -> XCiTPyramid:
        """A pyramid whose trunk starts from ``model``'s weights (a copy; ``model`` is unchanged).

        ``overrides`` set trunk options such as ``drop_path_rate``.
        """
        cfg = {k: v for k, v in model.arch_config.items() if k not in ("num_classes", "tokens_norm", "cls_attn_layers")}
        pyramid = cls(out_indices=out_indices, **{**cfg, **overrides})
        trunk_state = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("patch_embed", "pos_embeder", "blocks")}
        pyramid.load_state_dict(trunk_state, strict=False)
        return pyramid

    def min_input_size(self) -> int:
        """Smallest image side for which every level is non-empty (the stride-32 pooling needs one cell)."""
        return max(self.strides) - self.patch_size + 1

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        least = self.min_input_size()
        if min(x.shape[-2:]) < least:
            raise ValueError(
                f"expected images of at least {least}x{least} pixels for the stride-32 level of a patch-"
                f"{self.patch_size} pyramid, got {x.shape[-2]}x{x.shape[-1]}"
            )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.get_intermediate_layers(x, self.out_indices)
        fpns = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return OrderedDict((str(i), fpn(m)) for i, (fpn, m) in enumerate(zip(fpns, maps)))


def default_eta(depth: int) -> float:
    """LayerScale init of the official models: 1.0 up to depth 12, 1e-5 for deeper ones."""
    return 1.0 if depth <= 12 else 1e-5


def default_out_indices(depth: int) -> list[int]:
    """The official dense backbones' block choice: [3, 5, 7, 11] at depth 12, [7, 11, 15, 23] at 24."""
    if depth == 12:
        return [3, 5, 7, 11]
    if depth == 24:
        return [7, 11, 15, 23]
    step = depth // 4
    return [max(step - 1, 0), max(2 * step - 1, 0), max(3 * step - 1, 0), depth - 1]


def _resample(dim: int, patch_size: int, stride: int) -> nn.Module:
    """Take a stride-``patch_size`` map to ``stride``: transposed convs up, max-pool down."""
    if stride == patch_size:
        return nn.Identity()
    if stride > patch_size:
        factor = stride // patch_size
        return nn.MaxPool2d(kernel_size=factor, stride=factor)
    ups = (patch_size // stride).bit_length() - 1
    layers: list[nn.Module] = []
    for i in range(ups):
        if i > 0:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Turn every BatchNorm into SyncBatchNorm for multi-process training (as the official code)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Turn SyncBatchNorm layers back into BatchNorm2d (they cannot run on CPU outside DDP)."""
    if isinstance(model, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        bn.load_state_dict(model.state_dict())
        bn.train(model.training)
        return bn.to(next(model.parameters(), torch.empty(0)).device)
    for name, child in model.named_children():
        setattr(model, name, revert_sync_batchnorm(child))
    return model


def _batchnorm_safe_recompute(block: nn.Module):
    """Checkpoint contexts that keep BatchNorm running statistics from being updated twice."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextmanager
    def restore_stats() -> Iterator[None]:
        saved = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in norms]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, buffers in zip(norms, saved):
                    for k, v in buffers.items():
                        m._buffers[k].copy_(v)

    @contextmanager
    def nothing() -> Iterator[None]:
        yield

    return lambda: (nothing(), restore_stats())


def _is_fx_tracing() -> bool:
    """Under FX symbolic tracing shapes are proxies: input checks cannot branch on them."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
