"""Lockstep stages: every stage trains the same batch in the same step, for a rule that pipelines
one batch's microbatches through the stages itself (`UpdateRule.stage_lockstep`; end-to-end BP
under torch's pipeline schedules).

The strategy is `Pipeline`'s, with two differences. The batch (its images and targets) goes down
the stages as soon as the first stage has it, before any work, so the last stage holds the
targets its loss needs; activations and gradients travel inside the rule, over the process group
of this replica's stages that `stage_place` gives it. And no stage steps on a non-finite loss:
the last stage's verdict reaches every stage before the optimizer step (the stages wait for each
other within a step anyway). The lagged statistics, the stop vote, `sync` before evaluation and
checkpoints, data parallel replicas of each stage (rank = stage * D + replica, gradients averaged
over a stage's replicas) and the end of a short stream are `Pipeline`'s.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from localearn import distributed as dist_
from localearn.context import StagePlace
from localearn.engine.pipeline import Pipeline
from localearn.engine.stages import Layout
from localearn.interfaces import SplitNetwork, UpdateRule


class LockstepPipeline(Pipeline):
    """This process's stage of a lockstep pipeline (see the module's docs)."""

    def __init__(self, env: dist_.DistEnv, layout: Layout, starts: list[int],
                 rule: UpdateRule, net: SplitNetwork, optimizer: torch.optim.Optimizer,
                 device: torch.device, mode: str = "sync") -> None:
        super().__init__(env, layout, starts, rule, net, optimizer, device, mode)
        # the stages of each replica: every process makes every group, in the same order
        groups = [dist.new_group([layout.rank_of(s, r) for s in range(layout.stages)])
                  for r in range(layout.replicas)]
        self.place = StagePlace(layout.stage, layout.stages, groups[layout.replica], device)

    def stage_place(self) -> StagePlace:
        return self.place

    def add_wait(self, seconds: float) -> None:
        self.waited += seconds

    def begin(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        self._began = time.perf_counter()
        if not self.first:  # `DataEnd` leaves the step before it changes anything
            _, images, targets = self._receive()
        if not self.last:
            self._send(None, images, targets)
        self._batch = images, targets
        return images, targets

    def enter(self, index: int, x: Tensor) -> Tensor:
        return x

    def leave(self, index: int, output: Tensor) -> None:
        pass

    def local_slots(self, k: int, count: int) -> tuple[int, int]:
        """A lockstep rule reports its local losses alike on every stage (BP: none)."""
        return 0, count

    def verdict(self, stats: Tensor) -> bool:
        """Every process learns whether any loss of this step was not finite; then none
        steps (and all stop when the lagged statistics say so)."""
        flag = stats[-2:-1].clone()
        try:
            dist.all_reduce(flag)
        except RuntimeError as exc:
            raise self._lost(exc, "agreeing on the step's verdict") from None
        return not flag.item() > 0
