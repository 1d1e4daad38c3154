"""Process-group set-up for ``torchrun`` launches, metric reduction, and BatchNorm synchronisation.

``torchrun`` (or SLURM running ``torchrun`` once per node) sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT; :func:`setup` reads them. Without them the run is a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size``, its device, and whether it leads."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device a ``--device`` value names: ``auto`` (CUDA when available, else CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; ``ValueError`` for an unknown name or CUDA asked for where there is none."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"expected a device such as auto, cpu, cuda or cuda:1, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available on this machine")
    return dev


def setup(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join the process group described by the ``torchrun`` environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world_size <= 1:
        return DistEnv(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs on this node; "
                             "use --nproc_per_node <= GPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(rank, world_size, local_rank, local_world, dev, backend)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all processes (a no-op for one process)."""
    if not env.distributed:
        return values
    if env.backend == "nccl":
        values = values.to(env.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every process."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, env: DistEnv) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over the whole global batch, on any device.

    ``nn.SyncBatchNorm`` works on GPUs only; this one all-reduces per-channel sums with autograd
    (``torch.distributed.nn``), so CPU processes on gloo normalise exactly like one process at the
    global batch size. Same parameters and buffers as BatchNorm2d, so checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() // c, dtype=xf.dtype, device=xf.device)
        stats = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronised BatchNorm for multi-process training: SyncBatchNorm on GPU, AllReduceBatchNorm2d on CPU."""
    if device.type == "cuda":
        from ..models import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return _swap_bn(model)


def _swap_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(module.weight.device if module.affine else "cpu")
    for name, child in module.named_children():
        setattr(module, name, _swap_bn(child))
    return module

