"""Samplers and loaders: resumable, seeded training epochs across processes; batched in-memory loading.

Every classification-style loader yields ``(images, targets, skipped_paths)``; ``skipped_paths`` lists
images of the batch that could not be read (always empty for in-memory data).

Training randomness in the data pipeline is a function of (run seed, epoch, position in the epoch)
only: :class:`EpochSampler` gives every sample a seed of its own, and the loaders set every random
generator from it around that sample's transform (:func:`seeded_rng`). So the augmentation an image
receives does not depend on the number of processes or loader workers, nor on where a run was
stopped and resumed, and a resumed run needs to store nothing of the data pipeline but its step.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import DataError, TensorImageDataset, collate_skipping

_MASK63 = (1 << 63) - 1


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator, Python's ``random`` and NumPy's global generator seeded from ``seed``;
    after: all three as they were (CUDA generators are never touched)."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class EpochSampler(Sampler):
    """This process's share of a training epoch: the same on every run, resumable mid-epoch.

    Epoch ``e`` draws a permutation seeded by ``seed + e`` (the same on every rank), repeats each index
    ``repeats`` times in a row (DeiT/XCiT's repeated augmentation: the copies land on different ranks,
    or in the same batch with one process), tiles it when the data hold fewer than ``min_samples``
    samples per process (a tiny data set still fills a batch), and deals it out round-robin. Each rank
    takes ``max(len // num_replicas, min_samples)`` samples per epoch, so an epoch costs the same with or
    without repetition. With ``repeats=1`` the ranks' batches together are exactly the batches of one
    process at the global batch size.

    With ``with_seeds`` it yields ``(index, seed)`` pairs, the seed a function of (``seed``, epoch,
    position in the epoch), for the loaders of :func:`build_loader` to seed the sample's augmentation.
    """

    def __init__(self, size: int, *, num_replicas: int = 1, rank: int = 0, repeats: int = 1, shuffle: bool = True,
                 seed: int = 0, min_samples: int = 0, with_seeds: bool = False) -> None:
        if size < 1:
            raise DataError("cannot sample from an empty dataset")
        if repeats < 1:
            raise ValueError(f"expected repeats >= 1, got {repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"expected rank in [0, {num_replicas}), got {rank}")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.repeats, self.shuffle, self.seed, self.with_seeds = repeats, shuffle, seed, with_seeds
        self.num_samples = max(size // num_replicas, min_samples)
        if self.num_samples == 0:
            raise DataError(f"{size} images cannot be shared out over {num_replicas} processes")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip its first ``start`` samples (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def _positions(self) -> torch.Tensor:
        return torch.arange(self.rank, self.num_samples * self.num_replicas, self.num_replicas)[self.start:]

    def indices(self) -> torch.Tensor:
        """The data indices this rank draws in the current epoch, from ``start`` on."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        total = self.num_samples * self.num_replicas
        if len(order) < total:
            order = order.repeat(-(-total // len(order)))
        return order[self._positions()]

    def seeds(self) -> torch.Tensor:
        """One seed per sample of :meth:`indices`, a function of (seed, epoch, position) alone."""
        mixed = (self.seed * 0x9E3779B97F4A7C15 + self.epoch * 0xBF58476D1CE4E5B9 + 0x5EED) & _MASK63
        g = torch.Generator().manual_seed(mixed)
        every = torch.randint(0, 2**62, (self.num_samples * self.num_replicas,), generator=g)
        return every[self._positions()]

    def __iter__(self) -> Iterator:
        if self.with_seeds:
            return iter(zip(self.indices().tolist(), self.seeds().tolist()))
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: each sample is made with every generator seeded from its seed
    (and the dataset's or its transform's own, through their ``reseed(seed)``), in whichever process fetches it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with seeded_rng(seed):
            for owner in (self.dataset, getattr(self.dataset, "transform", None)):
                reseed = getattr(owner, "reseed", None)
                if reseed is not None:
                    reseed(seed)
            return self.dataset[index]


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
        items = list(iter(self.sampler))
        seeded = bool(items) and isinstance(items[0], tuple)
        order = torch.as_tensor([i[0] for i in items] if seeded else items, dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            images = self.dataset.images[idx]
            if seeded:  # the batch's randomness from the seed of its first sample
                with seeded_rng(items[start][1]):
                    images = self.transform(images)
            else:
                images = self.transform(images)
            yield images, self.dataset.targets[idx], []

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def build_loader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    *,
    batch_transform: Callable | None = None,
    collate_fn: Callable | None = None,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
):
    """A loader of ``dataset`` in the order of ``sampler``.

    In-memory datasets go through :class:`TensorBatchLoader` with ``batch_transform``; others through a
    ``DataLoader`` with ``collate_fn`` (default :func:`collate_skipping`, which drops unreadable images:
    batches of ``(images, targets, skipped_paths)``). A sampler that yields seeds (:class:`EpochSampler`
    ``with_seeds``) seeds each sample's (or batch's) augmentation; the ``DataLoader`` then draws nothing
    from the process's own generators, whose streams stay the model's (dropout, drop path, mixup).
    """
    if isinstance(dataset, TensorImageDataset):
        if batch_transform is None:
            raise ValueError("an in-memory dataset needs a batch_transform")
        return TensorBatchLoader(dataset, sampler, batch_size, batch_transform, drop_last=drop_last)
    if getattr(sampler, "with_seeds", False):
        dataset = SeededItems(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn or collate_skipping,
        drop_last=drop_last, pin_memory=pin_memory, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
