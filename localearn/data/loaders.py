"""The one loader factory: every split of every dataset is loaded through `make_loader`."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from localearn.data.sampling import SeededSamples, ShardSampler


def _worker_signals(worker_id: int) -> None:
    """In a loader worker, SIGTERM ends the worker quietly, as SIGINT does (the main process
    finishes its step and writes a checkpoint; a worker killed by the signal would make the
    loader raise in the main process instead)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


class FullBatches:
    """A training loader over a stream that yields full batches only, however many workers.

    A `DataLoader` over an `IterableDataset` batches inside each worker, so ``drop_last``
    drops each worker's last partial batch (and a skipped sample shortens one): the epoch would
    hold fewer batches than ``len(dataset) // batch_size``. Here the workers' partial batches
    are joined, in the loader's fixed order, into full ones; only the run's last
    ``< batch_size`` samples are dropped. So an epoch delivers exactly ``len(self)`` batches
    unless samples are missing, and the order is a function of the stream alone.
    """

    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        self.loader = loader
        self.batch_size = batch_size

    # what the trainer reads and sets on a loader
    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def generator(self) -> torch.Generator | None:
        return self.loader.generator

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        self.loader.generator = value

    def __len__(self) -> int:
        return len(self.loader.dataset) // self.batch_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        n = self.batch_size
        pending: list[Any] = []
        held = 0
        for batch in self.loader:
            size = len(batch[0])
            if not pending and size == n:
                yield batch
                continue
            pending.append(batch)
            held += size
            while held >= n:
                joined = [torch.cat(parts) for parts in zip(*pending)]
                yield type(batch)(t[:n] for t in joined) if isinstance(batch, tuple) \
                    else [t[:n] for t in joined]
                rest = [t[n:] for t in joined]
                held -= n
                pending = [rest] if held else []
        # fewer than batch_size samples left: dropped, as drop_last does


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                seed: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader | FullBatches:
    """The loader of one split for one rank.

    Map-style sets: a `ShardSampler` gives this rank its indices (train: a permutation seeded
    by ``seed + epoch``, padded so every rank takes the same number of steps; test: in order,
    unpadded), and in training `SeededSamples` seeds each sample's augmentation by
    ``(seed, epoch, index)``, so a resumed run draws the same crops. An `IterableDataset`
    (a `ShardStream`) shards and shuffles itself; in training its batches are made whole
    across workers by `FullBatches`. The trainer calls ``set_epoch`` on the sampler or dataset
    and sets the sampler's ``skip`` to resume mid-epoch."""
    init = _worker_signals if workers else None
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_rank"):  # a ShardStream reads only this rank's part
            dataset.set_rank(rank, world_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            drop_last=False, pin_memory=pin_memory, worker_init_fn=init)
        return FullBatches(loader, batch_size) if train else loader
    if train:
        sampler = ShardSampler(len(dataset), shuffle=True, seed=seed, rank=rank,
                               world_size=world_size)
        return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size,
                          sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                          drop_last=len(dataset) > batch_size * world_size,
                          generator=torch.Generator().manual_seed(seed), worker_init_fn=init)
    sampler = ShardSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size,
                           pad=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=init)
