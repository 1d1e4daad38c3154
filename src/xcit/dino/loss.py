"""The DINO loss: cross-entropy between the centred, sharpened teacher and the student, over crop pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..train import distributed as dist_utils


class DINOLoss(nn.Module):
    """Mean over (global teacher crop, other student crop) pairs of ``-softmax((t - c) / T_t) . log_softmax(s / T_s)``.

    The centre ``c`` (a buffer, saved with the module) follows the batch mean of the teacher outputs
    of all processes with momentum ``center_momentum``; it is updated after the loss is computed.
    """

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if n_crops < 2:
            raise ValueError(f"expected at least the 2 global crops, got n_crops={n_crops}")
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_entropy = float("nan")  # mean entropy of the teacher's distributions (collapse watch)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                env: dist_utils.DistEnv | None = None) -> torch.Tensor:
        student = (student_out.float() / self.student_temp).chunk(self.n_crops)
        if len(teacher_out) * self.n_crops != 2 * len(student_out):
            raise ValueError(f"expected teacher outputs for 2 global crops of the student's {self.n_crops} crops, got "
                             f"{len(teacher_out)} teacher rows for {len(student_out)} student rows")
        probs = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()
        self.last_entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        total, pairs = student_out.new_zeros((), dtype=torch.float32), 0
        for iq, q in enumerate(probs.chunk(2)):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                pairs += 1
        self.update_center(teacher_out, env)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor, env: dist_utils.DistEnv | None = None) -> None:
        stats = torch.cat([teacher_out.detach().float().sum(0), teacher_out.new_tensor([len(teacher_out)]).float()])
        if env is not None and env.distributed:
            stats = dist_utils.all_reduce_sum(stats.cpu(), env).to(self.center.device)
        batch_center = stats[:-1] / stats[-1]
        self.center.mul_(self.center_momentum).add_(batch_center[None], alpha=1 - self.center_momentum)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: ``-mean(log d_i)``, ``d_i`` the distance from each L2-normalised row of
    ``features`` (B, D) to its nearest other row. Minimising it spreads the batch over the sphere, which
    counters the dimensional collapse of the features that k-NN retrieval suffers from."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"expected features (B, D) with B >= 2, got shape {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()
