"""Semantic segmentation heads on the XCiT pyramid: Semantic FPN and UperNet (+ auxiliary FCN head).

All heads take the pyramid's list of 4 maps (strides 4, 8, 16, 32) and return logits at stride 4;
:class:`Segmenter` upsamples them to the input size. Sizes are taken from the maps themselves
(never assumed to be exact powers of two), so rectangular inputs of any size work.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import XCiTPyramid

NORMS = ("bn", "gn")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm ("bn", the paper's SyncBN when distributed) or GroupNorm ("gn", 32 groups or fewer)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        groups = math.gcd(32, channels)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"expected norm in {NORMS}, got {kind!r}")


class ConvNormAct(nn.Sequential):
    """k x k conv (no bias) -> norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, norm: str = "bn") -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FPNNeck(nn.Module):
    """Feature pyramid network (Lin et al. 2017): 1x1 laterals, nearest top-down sum, 3x3 outputs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.out_channels = out_channels

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class SemanticFPNHead(nn.Module):
    """The panoptic-FPN semantic branch (Kirillov et al. 2019) on an FPN neck.

    Level i (stride 4 * 2^i) goes through max(1, i) blocks of 3x3 conv -> norm -> ReLU, each but
    the level-0 one followed by 2x bilinear upsampling; the stride-4 results are summed, then
    dropout and a 1x1 classifier. ``upsample="size"`` resizes each step to the next level's size;
    ``"x2"`` doubles the size and resizes the sum's terms at the end, as mmseg's FPNHead (the two
    differ only when a level's size is odd).
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, fpn_channels: int | None = None, channels: int = 128,
        norm: str = "bn", dropout: float = 0.1, upsample: str = "size",
    ) -> None:
        super().__init__()
        if upsample not in ("size", "x2"):
            raise ValueError(f"expected upsample 'size' or 'x2', got {upsample!r}")
        self.upsample = upsample
        fpn_channels = in_channels[-1] if fpn_channels is None else fpn_channels  # official: the backbone's width
        self.neck = FPNNeck(in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList()
        for level in range(len(in_channels)):
            blocks = [ConvNormAct(fpn_channels if k == 0 else channels, channels, 3, norm) for k in range(max(1, level))]
            self.scale_heads.append(nn.ModuleList(blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        pyramid = self.neck(feats)
        sizes = [p.shape[-2:] for p in pyramid]
        out = None
        for level, (blocks, x) in enumerate(zip(self.scale_heads, pyramid)):
            for k, block in enumerate(blocks):
                x = block(x)
                if level > 0 and self.upsample == "x2":
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                elif level > 0:  # up one level per block: stride 4 * 2^level -> ... -> 4
                    x = _resize(x, sizes[level - k - 1])
            out = x if out is None else out + _resize(x, out.shape[-2:])
        return self.classifier(self.dropout(out))


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet): adaptive average pools, 1x1 conv-norm-ReLU, upsampled back."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6), norm: str = "bn") -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1, norm)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[-2:]) for branch in self.branches]


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018): PPM on the coarsest level, FPN fusion of all levels.

    PPM (pool scales 1, 2, 3, 6) + concat + 3x3 bottleneck on level 3; 1x1 laterals on levels
    0-2; top-down sum; 3x3 FPN convs; all levels upsampled to stride 4, concatenated, fused by a
    3x3 conv; dropout; 1x1 classifier. Every conv is conv -> norm -> ReLU with ``channels`` (512).
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6), norm: str = "bn", dropout: float = 0.1,
    ) -> None:
        super().__init__()
        *low, top = in_channels
        self.ppm = PPM(top, channels, pool_scales, norm)
        self.bottleneck = ConvNormAct(top + len(pool_scales) * channels, channels, 3, norm)
        self.lateral = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in low)
        self.fpn = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in low)
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        *low, top = feats
        lat = [conv(f) for conv, f in zip(self.lateral, low)]
        lat.append(self.bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv-norm-ReLU, dropout, 1x1 classifier on one pyramid level."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, norm: str = "bn", dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


HEADS = ("fpn", "upernet")


class Segmenter(nn.Module):
    """XCiT pyramid + decode head (+ auxiliary FCN head on level ``aux_level``).

    ``forward(x)`` returns logits (B, num_classes, H, W) at the input size; in training mode with an
    auxiliary head it returns ``(logits, aux_logits)``, both at the input size.
    """

    def __init__(
        self, backbone: XCiTPyramid, num_classes: int, head: str = "upernet", channels: int | None = None,
        norm: str = "bn", dropout: float = 0.1, aux: bool | None = None, aux_channels: int | None = None,
        aux_level: int = 2, fpn_channels: int | None = None, fpn_upsample: str = "size",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"expected num_classes >= 1, got {num_classes!r}")
        if head not in HEADS:
            raise ValueError(f"expected head in {HEADS}, got {head!r}")
        in_ch = list(backbone.in_channels_list)
        if not 0 <= aux_level < len(in_ch):
            raise ValueError(f"expected aux_level in 0..{len(in_ch) - 1}, got {aux_level}")
        aux = (head == "upernet") if aux is None else aux
        self.backbone = backbone
        self.num_classes = num_classes
        if head == "fpn":
            channels = 128 if channels is None else channels
            self.decode_head = SemanticFPNHead(in_ch, num_classes, fpn_channels, channels, norm, dropout, fpn_upsample)
            fpn_channels = self.decode_head.neck.out_channels
        else:
            channels = 512 if channels is None else channels
            self.decode_head = UperNetHead(in_ch, num_classes, channels, norm=norm, dropout=dropout)
        aux_channels = (min(256, channels)) if aux_channels is None else aux_channels
        self.aux_head = FCNHead(in_ch[aux_level], num_classes, aux_channels, norm, dropout) if aux else None
        self.aux_level = aux_level
        self.head_config = dict(
            head=head, channels=channels, norm=norm, dropout=dropout, aux=aux, aux_channels=aux_channels,
            aux_level=aux_level, fpn_channels=fpn_channels,
            **({"fpn_upsample": fpn_upsample} if fpn_upsample != "size" else {}),
        )

    def check_size(self, height: int, width: int) -> None:
        """ValueError for an image too small for the stride-32 level (it max-pools the patch grid, floor)."""
        smallest = self.backbone.min_input_size()
        if min(height, width) < smallest:
            raise ValueError(
                f"expected an input of at least {smallest}x{smallest} pixels for patch {self.backbone.patch_size} "
                f"(the stride-32 level would be empty), got {(height, width)}; pad or upscale small images"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        if x.ndim == 4:
            self.check_size(*size)
        feats = list(self.backbone(x).values())
        logits = _resize(self.decode_head(feats), size)
        if self.training and self.aux_head is not None:
            return logits, _resize(self.aux_head(feats[self.aux_level]), size)
        return logits

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
