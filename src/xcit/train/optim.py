"""Optimizer, learning-rate schedule and parameter groups (weight-decay rules, layer-wise lr decay)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models import param_groups


def layer_id(name: str, depth: int) -> int:
    """Depth index for layer-wise lr decay: stem/positions/cls token 0, XCA block i -> i + 1, rest depth + 1."""
    if name.startswith(("patch_embed.", "pos_embeder.", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


WD_RULES = ("mmcv", "bias-norm")


def build_param_groups(
    model: nn.Module, weight_decay: float, *, exempt_per_channel: bool = False, layer_decay: float | None = None,
    read_no_weight_decay: bool = True,
) -> list[dict]:
    """AdamW groups: the official no-decay rules (``xcit.models.param_groups``), optionally split by depth.

    Every group carries ``decayed`` (whether a weight-decay schedule applies to it, even when the
    decay is 0 now). With ``layer_decay`` every group carries ``lr_scale = layer_decay ** (depth + 1 -
    layer)``: the head and class attention train at the full rate, each earlier block ``layer_decay``
    times slower.
    """
    groups = param_groups(model, weight_decay, exempt_per_channel=exempt_per_channel,
                          read_no_weight_decay=read_no_weight_decay)
    if layer_decay is None or layer_decay == 1.0:
        return [{**g, "lr_scale": 1.0, "decayed": i == 0} for i, g in enumerate(groups) if g["params"]]
    no_decay = {id(p) for p in groups[1]["params"]}
    depth = len(getattr(model, "blocks", []))
    split: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decayed = layer_id(name, depth), id(p) not in no_decay
        group = split.setdefault((lid, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0, "decayed": decayed,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid,
        })
        group["params"].append(p)
    return [split[k] for k in sorted(split)]


def dense_param_groups(model: nn.Module, weight_decay: float, rule: str = "mmcv", *,
                       exempt_per_channel: bool = False) -> list[dict]:
    """Groups of the detection / segmentation recipes.

    ``"mmcv"`` is the official configs' ``paramwise_cfg=dict(custom_keys={'norm': decay_mult=0})``
    under mmcv's default constructor: no decay for parameters whose name contains ``norm``, decay
    for all others, biases, BatchNorm and XCA temperatures included. ``"bias-norm"`` is the
    classification rule (:func:`build_param_groups`: biases and 1-d parameters exempt, and with
    ``exempt_per_channel`` the per-channel ones too).
    """
    if rule == "bias-norm":
        return build_param_groups(model, weight_decay, exempt_per_channel=exempt_per_channel)
    if rule != "mmcv":
        raise ValueError(f"expected a weight-decay rule in {WD_RULES}, got {rule!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "norm" not in n], "weight_decay": weight_decay, "decayed": True},
              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0, "decayed": False}]
    return [{**g, "lr_scale": 1.0} for g in groups if g["params"]]


def clip_grad_per_param_(params, max_norm: float) -> None:
    """DINO's ``utils.clip_gradients``: scale each gradient whose L2 norm exceeds ``max_norm`` to it
    (coefficient ``max_norm / (norm + 1e-6)``), every parameter on its own."""
    for p in params:
        if p.grad is not None:
            coef = max_norm / (p.grad.detach().norm(2) + 1e-6)
            p.grad.detach().mul_(coef.clamp(max=1.0))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, *, eps: float = 1e-8,
                    exempt_per_channel: bool = False, layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups`, each group's lr = ``lr * lr_scale``."""
    groups = build_param_groups(model, weight_decay, exempt_per_channel=exempt_per_channel, layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, eps=eps, betas=(0.9, 0.999))


class WarmupCosine:
    """lr factor at an iteration: linear warmup from ``warmup_lr``, then cosine to ``min_lr`` (or constant).

    A plain object (floats only) so that ``LambdaLR.state_dict()`` stores it and ``weights_only``
    loading restores it. Stepped every iteration, unlike the official code's once per epoch.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float,
                 kind: str = "cosine") -> None:
        self.base_lr, self.total_steps, self.warmup_steps = float(base_lr), int(total_steps), int(warmup_steps)
        self.warmup_lr, self.min_lr, self.kind = float(warmup_lr), float(min_lr), kind

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr


class EpochCosine:
    """The official schedule: timm 0.4.9's ``CosineLRScheduler`` stepped once, after each epoch.

    ``main.py`` calls ``lr_scheduler.step(epoch)`` at the end of epoch ``epoch``, so epoch ``e``
    (0-based) runs at ``f(max(e - 1, 0))``: the first two epochs at ``warmup_lr``. ``f(t)`` is a
    linear warm-up over ``warmup_epochs``, then ``min + (base - min) / 2 * (1 + cos(pi * t / epochs))``
    (timm's cosine counts the warm-up epochs: ``warmup_prefix=False``).
    """

    def __init__(self, base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float, warmup_lr: float,
                 min_lr: float, kind: str = "cosine") -> None:
        self.base_lr, self.epochs, self.steps_per_epoch = float(base_lr), int(epochs), max(int(steps_per_epoch), 1)
        self.warmup_epochs, self.warmup_lr, self.min_lr = float(warmup_epochs), float(warmup_lr), float(min_lr)
        self.kind = kind

    def lr(self, step: int) -> float:
        t = max(step // self.steps_per_epoch - 1, 0)
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_epochs
        if self.kind == "constant":
            return self.base_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.epochs))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int,
                    warmup_lr: float, min_lr: float, kind: str = "cosine", *,
                    steps_per_epoch: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped every iteration (group lr scales are kept): :class:`WarmupCosine`, or with
    ``steps_per_epoch`` the official once-per-epoch :class:`EpochCosine` (warm-up then in epochs:
    ``warmup_steps / steps_per_epoch``)."""
    if steps_per_epoch:
        schedule = EpochCosine(base_lr, total_steps // steps_per_epoch, steps_per_epoch, warmup_steps / steps_per_epoch,
                               warmup_lr, min_lr, kind)
    else:
        schedule = WarmupCosine(base_lr, total_steps, warmup_steps, warmup_lr, min_lr, kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class PolySchedule:
    """Poly decay (segmentation's schedule) ``(base - min) * (1 - progress) ** power + min`` after a linear warm-up.

    ``progress`` is the larger of step / total_steps and elapsed / time_limit_s, so a run capped by
    wall-clock time still anneals its learning rate to the end. Warm-up (mmseg's 'linear') starts
    at ``warmup_ratio`` of the scheduled rate and reaches it after ``warmup_steps``.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    time_limit_s: float | None = None

    def progress(self, step: int, elapsed_s: float = 0.0) -> float:
        p = step / max(self.total_steps, 1)
        if self.time_limit_s:
            p = max(p, elapsed_s / self.time_limit_s)
        return min(max(p, 0.0), 1.0)

    def lr(self, step: int, elapsed_s: float = 0.0) -> float:
        lr = (self.base_lr - self.min_lr) * (1.0 - self.progress(step, elapsed_s)) ** self.power + self.min_lr
        if step < self.warmup_steps:
            lr *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return lr


class StepSchedule:
    """Linear warm-up, then the rate times ``gamma`` at each milestone (fractions of the run).

    Progress is the larger of step / total and elapsed / time limit, so a run capped by wall-clock
    time still reaches its decays.
    """

    def __init__(self, base_lr: float, total: int, steps: list[float], gamma: float, warmup: int, warmup_ratio: float,
                 time_limit_s: float | None = None) -> None:
        if any(not 0 < s <= 1 for s in steps):
            raise ValueError(f"expected --lr-steps as fractions of the run in (0, 1], got {steps}")
        self.base_lr, self.total, self.steps, self.gamma = base_lr, max(total, 1), sorted(steps), gamma
        self.warmup, self.warmup_ratio, self.time_limit_s = warmup, warmup_ratio, time_limit_s

    def lr(self, step: int, elapsed_s: float = 0.0) -> float:
        progress = step / self.total
        if self.time_limit_s:
            progress = max(progress, elapsed_s / self.time_limit_s)
        lr = self.base_lr * self.gamma ** sum(progress >= s for s in self.steps)
        if step < self.warmup:
            lr *= self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup
        return lr
