"""The DINO projection head and the multi-crop network (backbone + head) for student and teacher."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..models import XCiT


class DINOHead(nn.Module):
    """MLP (GELU, ``hidden_dim`` wide) -> ``bottleneck_dim`` -> L2 normalisation -> weight-normalised
    linear layer of ``out_dim`` outputs (no bias). With ``norm_last_layer`` the weight norms are fixed to 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim, num_layers) < 1:
            raise ValueError(f"expected positive head sizes, got in {in_dim}, out {out_dim}, hidden {hidden_dim}, "
                             f"bottleneck {bottleneck_dim}, layers {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # The prototype scores are cosines in [-1, 1] that the loss divides by temperatures down to
        # 0.04: in bf16 (steps of 2^-8 near 1) that would quantise the teacher's logits by ~0.2, so
        # the normalisation and the last layer run in float32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, p=2)
            return self.last_layer(x)


class MultiCropNet(nn.Module):
    """An XCiT backbone (no classifier) and a DINO head applied to a list of crops.

    Consecutive crops of the same size go through the backbone as one batch; the outputs of all
    crops are concatenated in order: (sum of batch sizes, out_dim).
    """

    def __init__(self, backbone: XCiT, head: DINOHead) -> None:
        super().__init__()
        if getattr(backbone, "num_classes", 0) != 0:
            raise ValueError(f"expected a backbone without classifier (num_classes=0), got {backbone.num_classes} classes")
        self.backbone = backbone
        self.head = head

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, crops: list[torch.Tensor] | torch.Tensor,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops; with ``return_features`` also the backbone features they came from."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(features)
        out = self.head(features)
        return (out, features) if return_features else out


def last_layer_params(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of the head's last layer (frozen during the first epoch(s))."""
    return [p for n, p in net.named_parameters() if ".last_layer." in f".{n}"]
