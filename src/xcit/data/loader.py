"""Samplers and loaders: repeated augmentation across processes, batched in-memory loading.

Every loader yields ``(images, targets, skipped_paths)``; ``skipped_paths`` lists images of the
batch that could not be read (always empty for in-memory data).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import DataError, TensorImageDataset, collate_skipping


class RepeatAugSampler(Sampler[int]):
    """Shuffled indices for one process of ``num_replicas``, each image repeated ``repeats`` times.

    The repeated augmentation of DeiT/XCiT (``repeats=3``): every epoch draws a permutation
    (seeded by ``seed + epoch``, the same on every rank), repeats each index ``repeats`` times in
    a row and deals the list out round-robin, so the copies of an image land on different ranks
    (or in the same batch with one process). Each rank takes ``len(dataset) // num_replicas``
    indices per epoch, so an epoch costs the same with or without repetition.
    With ``repeats=1`` this is a plain distributed shuffle; the ranks' batches together are then
    exactly the batches of one process at the global batch size.
    """

    def __init__(
        self, size: int, *, num_replicas: int = 1, rank: int = 0, repeats: int = 1, shuffle: bool = True, seed: int = 0
    ) -> None:
        if size < 1:
            raise DataError("cannot sample from an empty dataset")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.repeats, self.shuffle, self.seed = repeats, shuffle, seed
        self.num_samples = size // num_replicas
        if self.num_samples == 0:
            raise DataError(f"{size} images cannot be shared out over {num_replicas} processes")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip its first ``start`` indices (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        total = self.num_samples * self.num_replicas
        mine = order[:total][self.rank::self.num_replicas]
        return mine[self.start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding (exact evaluation)."""

    def __init__(self, size: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


class TensorBatchLoader:
    """Batches of an in-memory :class:`TensorImageDataset`, transformed a whole batch at a time."""

    def __init__(
        self,
        dataset: TensorImageDataset,
        sampler: Sampler[int],
        batch_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        drop_last: bool = False,
    ) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.transform, self.drop_last = transform, drop_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield self.transform(self.dataset.images[idx]), self.dataset.targets[idx], []

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def build_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    batch_size: int,
    *,
    batch_transform: Callable | None = None,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
):
    """A loader yielding ``(images, targets, skipped_paths)``.

    In-memory datasets go through :class:`TensorBatchLoader` with ``batch_transform``; others
    through a ``DataLoader`` whose collate function drops unreadable images.
    """
    if isinstance(dataset, TensorImageDataset):
        if batch_transform is None:
            raise ValueError("an in-memory dataset needs a batch_transform")
        return TensorBatchLoader(dataset, sampler, batch_size, batch_transform, drop_last=drop_last)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skipping,
        drop_last=drop_last, pin_memory=pin_memory, persistent_workers=workers > 0,
    )
