"""The batches of each epoch: the training, test (and validation) loaders a run reads,
sharded as the parallel strategy says, and the epoch's batches after a resume (a shard sampler
seeks; a stream is read up to the resume point and its random state put back). A later
pipelined stage reads nothing: its batches arrive with the activations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from localearn.config import FitConfig
from localearn.data import make_loader
from localearn.data.sampling import ShardSampler, sample_seed
from localearn.engine.checkpoint import set_rng_state
from localearn.engine.parallel import Single
from localearn.errors import UserError


class BatchFeed:
    """The run's loaders and the batches of each epoch (at most the planned number)."""

    def __init__(self, cfg: FitConfig, data: Any, strategy: Single, device: torch.device,
                 input_shape: tuple[int, ...]) -> None:
        self.cfg, self.strategy, self.device, self.input_shape = cfg, strategy, device, \
            input_shape
        env, pin = strategy.env, device.type == "cuda"
        rank, world = strategy.data_rank, strategy.data_world  # stages: sharded by replica
        if cfg.data_on_device:  # decoded once, kept and augmented on the device
            from localearn.data.on_device import device_loader

            self.train: Any = device_loader(data.train, batch_size=cfg.batch_size,
                                            device=device, workers=cfg.workers, seed=cfg.seed,
                                            rank=rank, world_size=world)
        else:
            self.train = make_loader(data.train, batch_size=cfg.batch_size, train=True,
                                     workers=cfg.workers, seed=cfg.seed, rank=rank,
                                     world_size=world, pin_memory=pin,
                                     drop_last=cfg.drop_last)
        sampler = self.train.sampler
        self.sampler = sampler if isinstance(sampler, ShardSampler) else None
        self.test: DataLoader = make_loader(data.test, batch_size=max(256, cfg.batch_size),
                                            train=False, workers=cfg.workers, rank=env.rank,
                                            world_size=env.world_size, pin_memory=pin)
        self.val: DataLoader | None = None if data.val is None else make_loader(
            data.val, batch_size=max(256, cfg.batch_size), train=False, workers=cfg.workers,
            rank=env.rank, world_size=env.world_size, pin_memory=pin)
        self.planned = len(self.train)
        if self.planned == 0:
            raise UserError(f"no training batches: {len(data.train)} images for "
                            f"{env.world_size} process(es) of batch {cfg.batch_size}")
        self.data_rank = rank
        self.resume_rng: dict[str, Any] | None = None  # put back after a stream's skip

    def batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """The epoch's batches, the first ``skip`` left out (resume), at most the planned
        number (a stream holding more samples than it stated stops there)."""
        for i, batch in enumerate(self._stream(epoch, skip), start=skip):
            if i >= self.planned:
                return
            yield batch

    def _stream(self, epoch: int, skip: int) -> Iterator[Any]:
        if not self.strategy.reads_data:
            # a later pipeline stage: each batch comes with stage 0's activations, so nothing
            # is read here; if stage 0's stream runs out early its step raises `DataEnd`
            images = torch.empty(0, *self.input_shape, device=self.device)
            targets = torch.empty(0, dtype=torch.long, device=self.device)
            while True:
                yield images, targets
        for owner in (self.sampler, self.train.dataset):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.skip = skip * self.cfg.batch_size
            try:
                yield from self.train
            finally:
                self.sampler.skip = 0
        else:
            # loader workers seeded from (seed, epoch, rank), not from the global RNG, so a
            # deterministic stream augments the same way after a resume
            self.train.generator = torch.Generator().manual_seed(
                sample_seed(self.cfg.seed, epoch, self.data_rank))
            it = iter(self.train)
            for _ in range(skip):  # a stream cannot seek: read and drop
                next(it, None)
            if skip and self.resume_rng is not None:  # undo what reading consumed
                set_rng_state(self.resume_rng)
            self.resume_rng = None
            yield from it
