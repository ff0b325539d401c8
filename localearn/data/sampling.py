"""Data order and augmentation that are pure functions of (seed, epoch, position).

Exact resume and exact data parallelism both need the same thing: the sample a rank sees at
step s, and the random crop applied to it, must not depend on how the run got to step s
(killed and resumed, one process or several, 0 or 8 loader workers).

- `ShardSampler` draws the epoch's permutation from ``seed + epoch`` (as
  `torch.utils.data.DistributedSampler` does), gives rank r the positions ``r::world_size`` and
  can skip the first positions of an epoch (resume mid-epoch without reading skipped samples).
- `SeededSamples` runs a dataset's random transform under a generator seeded from
  ``(seed, epoch, index)``, so augmentation is the same in a worker, after a resume, or on
  another rank, and the process's global RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

_MASK = 2**63 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & _MASK


class ShardSampler(Sampler[int]):
    """Indices of one rank for one epoch.

    ``shuffle``: a permutation seeded by ``seed + epoch``, else ``0..n-1``. ``pad`` repeats the
    first indices so every rank gets the same count (training: all ranks must take the same
    number of steps); without it ranks get ``n // world_size`` or one more (evaluation).
    ``skip`` drops this rank's first positions of the current epoch (resume); set it before the
    epoch starts and reset it to 0 for the next one.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        """All of this rank's indices for the current epoch, skipped ones included."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += (order * (extra // max(1, self.n) + 1))[:extra]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        if self.pad:
            full = -(-self.n // self.world_size)
        else:
            full = len(range(self.rank, self.n, self.world_size))
        return max(0, full - self.skip)


class SeededSamples(Dataset):
    """``dataset[i]`` with its random transform seeded by ``(seed, epoch, i)``.

    The process's global torch RNG is saved and restored around each sample, so model code
    (dropout, rule sampling) draws the same numbers however the data is loaded.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # the CPU generator only (torch.manual_seed would also seed every GPU: 100x slower);
        # transforms draw from it, also when CUDA is in use
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(sample_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            gen.set_state(saved)
