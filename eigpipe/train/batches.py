"""Deterministic, resumable batches: batch ``i`` is a pure function of (seed, i), whatever the start.

The sample order is a fresh permutation per epoch seeded by (seed, epoch), and augmentation decisions
are seeded by (seed, iteration, position), so a resumed run sees exactly the batches an uninterrupted
run would have seen, with or without data-loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

Key = tuple[int, int, int]  # (sample index, iteration, position in the global batch)


@cache
def _epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(size, generator=generator).tolist())


def batch_keys(iteration: int, batch_size: int, size: int, seed: int) -> list[Key]:
    keys = []
    for position in range(batch_size):
        flat = iteration * batch_size + position
        epoch, offset = divmod(flat, size)
        keys.append((_epoch_order(seed, epoch, size)[offset], iteration, position))
    return keys


class IterationSampler(Sampler[list[Key]]):
    """Yields this rank's share of batches ``start`` .. ``stop - 1``."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def __iter__(self) -> Iterator[list[Key]]:
        for iteration in range(self.start, self.stop):
            yield batch_keys(iteration, self.batch_size, self.size, self.seed)[self.rank :: self.world]

    def __len__(self) -> int:
        return self.stop - self.start


class AugmentedDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, iteration, position)]`` applies seeded augmentation."""

    def __init__(self, dataset: Dataset, augment: Callable[[object, np.random.Generator], object], seed: int):
        self.dataset, self.augment, self.seed = dataset, augment, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> object:
        index, iteration, position = key
        rng = np.random.default_rng([self.seed, iteration, position])
        return self.augment(self.dataset[index], rng)
