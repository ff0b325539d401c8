"""Learning-rate schedules by name (`FitConfig.schedule`).

A schedule maps the run's position to a learning rate: ``lr(step, epoch, steps_per_epoch,
total_steps)``, with ``step`` the optimizer steps done, ``epoch`` the current epoch counted
from 1 (as the trainer counts it), ``steps_per_epoch`` the planned batches of an epoch and
``total_steps`` the schedule's length in steps. It holds no other state: a resumed run that
restores its position follows the same figures. ``state_dict`` records its name and settings
(saved with every checkpoint as ``scheduler``); ``load_state_dict`` refuses another schedule's.

- ``warmup_cosine`` (the default): set before every step; a linear warm-up from
  ``warmup_lr`` to ``lr`` over ``warmup_epochs`` (default 5% of the run, in steps), then a
  cosine to 0 over the remaining steps.
- ``public_cifar``: the public MLAAN CIFAR trainer's ``--cos_lr``, set once per epoch. With
  e the epoch counted from 1 and E the run's epochs, ``0.5 * lr * (1 + cos(pi * e / E))``,
  and for e <= 10 that times ``(e - 1) / 10`` plus ``0.01 * (11 - e) / 10`` (a warm-up from
  0.01). The last epoch's rate is 0, as in the public code.
- ``public_imagenet``: the public MLAAN ImageNet trainer's, once per epoch, no warm-up:
  ``0.5 * lr * (1 + cos(pi * (e - 1) / E))``.

The public schedules take their warm-up from the public code, not from ``warmup_epochs`` and
``warmup_lr``, which only ``warmup_cosine`` reads.
"""

from __future__ import annotations

import math
from typing import Any

from localearn.errors import UserError

#: the public CIFAR trainer's warm-up: its first 10 epochs, from 0.01
PUBLIC_WARMUP_EPOCHS = 10
PUBLIC_WARMUP_LR = 0.01


def warmup_cosine(step: int, total: int, warmup: int, lr: float, warmup_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


class Schedule:
    """A learning rate as a function of the run's position (see the module's docs)."""

    name = ""

    def __init__(self, lr: float, epochs: int) -> None:
        self.base_lr, self.epochs = lr, epochs

    #: steps of linear warm-up before the decay (0: none, or counted in epochs)
    warmup_steps = 0

    def lr(self, step: int, epoch: int, steps_per_epoch: int, total_steps: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.base_lr, "epochs": self.epochs,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that ``state`` was saved by this schedule (it holds no other state)."""
        if state.get("name", self.name) != self.name:
            raise UserError(f"the checkpoint's schedule is {state['name']!r}, this run's "
                            f"{self.name!r}; resume with --schedule {state['name']}")


class WarmupCosine(Schedule):
    """Per step: linear warm-up over ``warmup_steps``, then cosine to 0 (`warmup_cosine`)."""

    name = "warmup_cosine"

    def __init__(self, lr: float, epochs: int, warmup_steps: int, warmup_lr: float) -> None:
        super().__init__(lr, epochs)
        self.warmup_steps, self.warmup_lr = warmup_steps, warmup_lr

    def lr(self, step: int, epoch: int, steps_per_epoch: int, total_steps: int) -> float:
        return warmup_cosine(step, total_steps, self.warmup_steps, self.base_lr,
                             self.warmup_lr)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warmup_lr": self.warmup_lr}


class PublicCifar(Schedule):
    """The public CIFAR trainer's ``--cos_lr``, per epoch, with its 10-epoch warm-up."""

    name = "public_cifar"

    def lr(self, step: int, epoch: int, steps_per_epoch: int, total_steps: int) -> float:
        e, warm = epoch, PUBLIC_WARMUP_EPOCHS
        cosine = 0.5 * self.base_lr * (1 + math.cos(math.pi * e / self.epochs))
        if e <= warm:
            return cosine * (e - 1) / warm + PUBLIC_WARMUP_LR * (warm + 1 - e) / warm
        return cosine


class PublicImagenet(Schedule):
    """The public ImageNet trainer's cosine, per epoch, from the first epoch's full rate."""

    name = "public_imagenet"

    def lr(self, step: int, epoch: int, steps_per_epoch: int, total_steps: int) -> float:
        return 0.5 * self.base_lr * (1 + math.cos(math.pi * (epoch - 1) / self.epochs))


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (WarmupCosine, PublicCifar, PublicImagenet)}


def make_schedule(cfg: Any, steps_per_epoch: int) -> Schedule:
    """The schedule ``cfg.schedule`` names, for a run of ``steps_per_epoch`` planned batches
    per epoch (``cfg``: a `FitConfig`)."""
    name = getattr(cfg, "schedule", WarmupCosine.name)
    if name == WarmupCosine.name:
        warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else 0.05 * cfg.epochs
        return WarmupCosine(cfg.lr, cfg.epochs, round(warm * steps_per_epoch), cfg.warmup_lr)
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](cfg.lr, cfg.epochs)
