"""The one loader factory: every split of every dataset is loaded through `make_loader`."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset, IterableDataset

from localearn.data.sampling import SeededSamples, ShardSampler


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                seed: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """The loader of one split for one rank.

    Map-style sets: a `ShardSampler` gives this rank its indices (train: a permutation seeded
    by ``seed + epoch``, padded so every rank takes the same number of steps; test: in order,
    unpadded), and in training `SeededSamples` seeds each sample's augmentation by
    ``(seed, epoch, index)``, so a resumed run draws the same crops. An `IterableDataset`
    (a `ShardStream`) shards and shuffles itself. The trainer calls ``set_epoch`` on the
    sampler or dataset and sets the sampler's ``skip`` to resume mid-epoch."""
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_rank"):  # a ShardStream reads only this rank's part
            dataset.set_rank(rank, world_size)
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                          drop_last=train, pin_memory=pin_memory)
    if train:
        sampler = ShardSampler(len(dataset), shuffle=True, seed=seed, rank=rank,
                               world_size=world_size)
        import torch

        return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size,
                          sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                          drop_last=len(dataset) > batch_size * world_size,
                          generator=torch.Generator().manual_seed(seed))
    sampler = ShardSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size,
                           pad=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory)
