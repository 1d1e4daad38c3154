"""Training losses: (soft-target) cross-entropy and DeiT-style distillation through the single head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against per-class target distributions (mixup/cutmix labels)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class LabelCrossEntropy(nn.Module):
    """Cross-entropy against class indices, with optional label smoothing."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


class DistillationLoss(nn.Module):
    """DeiT's distillation loss, XCiT style: the same head is trained on labels and on the teacher.

    ``loss = (1 - alpha) * base(out, labels) + alpha * distill(out, teacher(images))``, where the
    hard variant uses the teacher's argmax as the label and the soft one the KL divergence at
    temperature ``tau`` (scaled by tau^2, as DeiT).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"distillation must be soft or hard, got {kind!r}")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, images: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = self.base(logits, target)
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        if self.kind == "soft":
            t = self.tau
            distill = F.kl_div(
                F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                reduction="sum", log_target=True,
            ) * (t * t) / logits.numel()
        else:
            distill = F.cross_entropy(logits, teacher_logits.argmax(dim=1))
        return base * (1 - self.alpha) + distill * self.alpha
