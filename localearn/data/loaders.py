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
    ``< batch_size`` samples are dropped, or, with ``keep_last``, yielded as one last partial
    batch (unless it holds a single sample: see `make_loader`). So an epoch delivers exactly
    ``len(self)`` batches unless samples are missing, and the order is a function of the
    stream alone.
    """

    def __init__(self, loader: DataLoader, batch_size: int, keep_last: bool = False) -> None:
        self.loader = loader
        self.batch_size = batch_size
        self.keep_last = keep_last

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
        n = len(self.loader.dataset)  # type: ignore[arg-type]
        return n // self.batch_size + int(self.keep_last and n % self.batch_size > 1)

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
        if self.keep_last and held > 1:  # the last partial batch, kept
            joined = [torch.cat(parts) for parts in zip(*pending)]
            yield type(batch)(joined) if isinstance(batch, tuple) else joined
        # else fewer than batch_size samples left (or one): dropped, as drop_last does


def keeps_last(samples: int, batch_size: int, drop_last: bool) -> bool:
    """Whether a training epoch of ``samples`` (one rank's) ends with a partial batch: only
    with ``drop_last`` off, and not a partial batch of one sample, which BatchNorm cannot
    train on (the run would stop on it), so it is dropped anyway."""
    return not drop_last and samples % batch_size > 1


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                seed: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, drop_last: bool = True) -> DataLoader | FullBatches:
    """The loader of one split for one rank.

    Map-style sets: a `ShardSampler` gives this rank its indices (train: a permutation seeded
    by ``seed + epoch``, padded so every rank takes the same number of steps; test: in order,
    unpadded), and in training `SeededSamples` seeds each sample's augmentation by
    ``(seed, epoch, index)``, so a resumed run draws the same crops. An `IterableDataset`
    (a `ShardStream`) shards and shuffles itself; in training its batches are made whole
    across workers by `FullBatches`. The trainer calls ``set_epoch`` on the sampler or dataset
    and sets the sampler's ``skip`` to resume mid-epoch.

    ``drop_last`` (training): each epoch's last partial batch is dropped (the default), or
    kept (``False``, as the public MLAAN trainer does), except a last batch of one sample,
    which BatchNorm cannot train on. Every rank holds as many samples (the sampler pads), so
    every rank keeps or drops alike and all take the same number of steps; only the last batch
    is partial, so resuming after ``s`` batches skips ``s * batch_size`` samples as before. A
    training set no larger than one batch per rank is one partial batch either way."""
    init = _worker_signals if workers else None
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_rank"):  # a ShardStream reads only this rank's part
            dataset.set_rank(rank, world_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            drop_last=False, pin_memory=pin_memory, worker_init_fn=init)
        return FullBatches(loader, batch_size, keep_last=not drop_last) if train else loader
    if train:
        sampler = ShardSampler(len(dataset), shuffle=True, seed=seed, rank=rank,
                               world_size=world_size)
        per_rank = len(sampler)
        drop = per_rank > batch_size and not keeps_last(per_rank, batch_size, drop_last)
        return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size,
                          sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                          drop_last=drop, generator=torch.Generator().manual_seed(seed),
                          worker_init_fn=init)
    sampler = ShardSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size,
                           pad=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=init)
