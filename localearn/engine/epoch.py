"""The epoch: the batches of one epoch through the run's `Step`, the learning rate set before
each, the step log, the progress bar and periodic checkpoints; what an epoch delivered checked
against its plan (see `localearn.engine.loop` for the rules). Part of `Trainer`."""

from __future__ import annotations

import time
from typing import Any

import torch

from localearn.config import FitConfig
from localearn.engine.feed import BatchFeed
from localearn.engine.parallel import DataEnd, NonFiniteLoss
from localearn.engine.schedule import Schedule
from localearn.engine.signals import StopSignals
from localearn.engine.state import RunState
from localearn.errors import UserError
from localearn.runlog import LOGGER, RunLog, peak_memory_mb

#: an epoch delivering fewer than this share of its planned batches is a warning
SHORT_EPOCH = 0.5


class EpochLoop:
    """The training half of `Trainer`: it trains epochs; checkpoints are `RunFiles`'."""

    cfg: FitConfig
    device: torch.device
    env: Any
    data: Any
    net: Any
    aux: Any
    optimizer: torch.optim.Optimizer
    stepper: Any
    strategy: Any
    feed: BatchFeed
    schedule: Schedule
    state: RunState
    log: RunLog
    steps_per_epoch: int
    _bar: Any
    _signals: StopSignals
    _stopped: bool

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def total_steps(self) -> int:
        """The schedule's length: the planned batches of every epoch, less those that
        finished epochs did not deliver (so the learning rate reaches its end)."""
        return self.steps_per_epoch * self.cfg.epochs - self.state.short

    def set_lr(self) -> float:
        lr = self.schedule.lr(self.step, self.epoch, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (or its rest, after a resume); its summary row."""
        cfg, device, state = self.cfg, self.device, self.state
        self.net.train()
        self.aux.train()
        state.start_epoch(epoch)
        step_times: list[float] = []
        images_done = 0
        lr = self.set_lr()
        start = last = time.perf_counter()
        batches = self.feed.batches(epoch, state.batch_in_epoch)
        while True:
            try:
                images, targets = next(batches)
            except StopIteration:
                if state.batch_in_epoch < self.steps_per_epoch:
                    self.strategy.end_of_data()  # later pipelined stages stop here too
                break
            except Exception:
                if self._signals.signum is not None:  # loader workers hit by the signal too
                    self._stopped = True
                    break
                raise
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            lr = self.set_lr()
            self.stepper.stop_vote = self._signals.signum is not None
            try:
                totals = self.stepper(images, targets)
            except NonFiniteLoss as bad:
                self._diverged(bad.value, epoch)
            except DataEnd:  # a later stage: stage 0's stream ended early
                break
            state.add_step(totals)
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            images_done += int(totals[2])
            if self._stop_asked():
                self._stopped = True
                break
            self._after_batch(epoch, lr, totals, step_times[-1])
        images_done += self._drain(epoch)
        sums = state.epoch_sums
        seen = max(1.0, sums[2]) if sums else 1.0
        elapsed = time.perf_counter() - start
        return {"epoch": epoch, "step": state.step, "lr": lr,
                "batches": state.batch_in_epoch, "planned_batches": self.steps_per_epoch,
                "train_loss": sums[0] / seen if sums else float("nan"),
                "train_acc": sums[1] / seen if sums else float("nan"),
                "local_losses": [s / seen for s in sums[3:]],
                "images": int(sums[2]) if sums else 0,
                "epoch_time": elapsed,
                "step_time": sum(step_times) / max(1, len(step_times)),
                "images_per_s": images_done / elapsed if elapsed > 0 else 0.0,
                "peak_mem_mb": peak_memory_mb(device)}

    def _after_batch(self, epoch: int, lr: float, totals: list[float], step_time: float) -> None:
        """Progress bar, step log, periodic checkpoint."""
        cfg = self.cfg
        n = max(1.0, totals[2])
        if self._bar is not None:
            self._bar.set_description(f"epoch {epoch}/{cfg.epochs}", refresh=False)
            self._bar.set_postfix(loss=f"{totals[0] / n:.3f}", acc=f"{totals[1] / n:.1%}",
                                  img_s=f"{totals[2] / step_time:.0f}", refresh=False)
            self._bar.update()
        # every log_every steps, and each epoch's first and last (so short runs log too)
        if self.step % cfg.log_every == 0 or self.state.batch_in_epoch in (
                1, self.steps_per_epoch):
            self.log.step({"step": self.step, "epoch": epoch, "lr": lr,
                           "loss": totals[0] / n, "train_acc": totals[1] / n,
                           "local_losses": [v / n for v in totals[3:]],
                           "step_time": step_time, "images_per_s": totals[2] / step_time,
                           "peak_mem_mb": peak_memory_mb(self.device)})
        if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                and self.state.batch_in_epoch < self.steps_per_epoch):  # epoch ends save anyway
            self.save_checkpoint()

    def _stop_asked(self) -> bool:
        """A signal asked this run to stop (on any rank: the vote went with the step)."""
        if self.env.enabled:
            return self.stepper.stop_requested
        return self._signals.signum is not None

    def _end_of_epoch(self, epoch: int, row: dict) -> None:
        """Check what the epoch delivered against the plan: none is an error; fewer re-plans
        the schedule from what was delivered; fewer than `SHORT_EPOCH` of it is a warning."""
        delivered, planned = self.state.batch_in_epoch, self.steps_per_epoch
        if delivered == 0:
            stats = getattr(self.data.train, "skipped", None)
            why = (f" ({stats['samples']} undecodable samples and {stats['shards']} unreadable "
                   "shards so far)" if isinstance(stats, dict) else "")
            raise UserError(f"epoch {epoch} delivered no training batches of "
                            f"{self.cfg.batch_size} (planned {planned}){why}: there is nothing "
                            "to train on; check the training data")
        if delivered >= planned:
            return
        self.state.short += planned - delivered
        if self._bar is not None:
            self._bar.total = self.total_steps
        if delivered < SHORT_EPOCH * planned:
            msg = (f"epoch {epoch} delivered {delivered} of {planned} planned batches "
                   f"({delivered / planned:.0%}, below {SHORT_EPOCH:.0%}): samples are missing "
                   "(corrupt, unreadable, or fewer than the data's stated count); the schedule "
                   "was re-planned from the batches delivered")
            row["warning"] = msg
            if self.env.is_main:
                if self._bar is not None:
                    self._bar.clear()
                LOGGER.warning(msg)

    def _drain(self, epoch: int) -> int:
        """A pipelined step reads its statistics some steps late: add those not read yet to
        the epoch's sums; the images they count."""
        try:
            pending = self.stepper.drain()
        except NonFiniteLoss as bad:
            self._diverged(bad.value, epoch)
        if not pending:
            return 0
        sums = self.state.epoch_sums
        self.state.epoch_sums = [a + b for a, b in zip(sums, pending)] if sums else pending
        return int(pending[2])

