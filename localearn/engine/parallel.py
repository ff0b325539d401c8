"""How a step's work is spread over processes: one process (`Single`), data parallel
(`DataParallel`) or pipelined stages (`localearn.engine.pipeline.Pipeline`, optionally with data
parallel replicas of each stage).

The `Step` and the `Trainer` call the same methods whatever the strategy; a strategy owns the
process groups, which samples a process reads, the gradient reduction, how the step's statistics
are summed (at once, or some steps late on stages), the stop vote, bringing every process's copy
of the run up to date before evaluation and checkpoints, and the transport between stages that a
rule reaches through its `StepContext` (a pass-through here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from localearn import distributed as dist_
from localearn.context import StagePlace


class NonFiniteLoss(Exception):
    """A loss of this step was NaN or infinite (the step was not applied)."""

    def __init__(self, value: float = float("nan")) -> None:
        super().__init__(value)
        self.value = value


class DataEnd(Exception):
    """Raised by a later pipeline stage's step when the first stage's stream ended before the
    epoch's planned batches: the epoch ends there too."""


class Single:
    """One process: every module here, statistics read at once, nothing to synchronise."""

    stage_mode = "sync"
    microbatches = 1  # --microbatches, for a rule that takes them (`make_strategy` sets it)

    def __init__(self, env: dist_.DistEnv | None = None) -> None:
        self.env = env or dist_.DistEnv()
        self.reducer: dist_.GradReducer | None = None
        self.stop_requested = False
        self._totals: list[float] = []

    # -- data
    @property
    def reads_data(self) -> bool:
        """Whether this process reads the training data (later stages receive it)."""
        return True

    @property
    def data_rank(self) -> int:
        return self.env.rank

    @property
    def data_world(self) -> int:
        return self.env.world_size

    def end_of_data(self) -> None:
        """The epoch's stream ended before its planned batches (stages pass it on)."""

    # -- the rule's transport (`StepContext`)
    def modules(self, k: int) -> range:
        return range(k)

    def holds_last(self, k: int) -> bool:
        return True

    def begin(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The batch this process trains on now (a later stage's comes from the previous)."""
        return images, targets

    def enter(self, index: int, x: Tensor) -> Tensor:
        return x

    def leave(self, index: int, output: Tensor) -> None:
        pass

    def send_back(self, grad: Tensor) -> None:
        raise RuntimeError("send_back: this process has no previous stage")

    def take_back(self, like: Tensor) -> Tensor:
        raise RuntimeError("take_back: this process has no next stage")

    def stage_place(self) -> StagePlace | None:
        """Where this process stands in a lockstep pipeline (None: it is not on one)."""
        return None

    def add_wait(self, seconds: float) -> None:
        """Time a lockstep rule spent blocked on other stages (the idle fraction's)."""

    # -- statistics and the verdict
    def local_slots(self, k: int, count: int) -> tuple[int, int]:
        """Where the rule's ``count`` local losses go in the statistics: (offset, slots)."""
        return 0, count

    def verdict(self, stats: Tensor) -> bool:
        """Sum ``[.., non-finite count, stop vote]`` over the job; raise `NonFiniteLoss` when
        any loss was not finite (no process steps); True: step the optimizer."""
        if self.env.enabled:
            torch.distributed.all_reduce(stats)
        totals = stats.tolist()  # the step's one host synchronisation
        self.stop_requested = totals.pop() > 0
        if totals.pop():
            raise NonFiniteLoss
        self._totals = totals
        return True

    def after_optimizer(self) -> None:
        """After the optimizer step, before the rule's ``after_step``."""

    def finish(self, stats: Tensor) -> list[float]:
        """The summed ``[loss*n, correct, n, *local*n]`` of this step (stages: of an earlier
        one, zeros while the pipeline fills)."""
        return self._totals

    def drain(self) -> list[float] | None:
        """The summed statistics of steps not reported yet (None: there are none)."""
        return None

    def sync(self, net: nn.Module, aux: nn.Module) -> None:
        """Make every process's copy of the run current (before evaluation, checkpoints)."""

    def idle_fraction(self) -> float:
        return 0.0


class DataParallel(Single):
    """Every process trains every module on its shard of the data; gradients are averaged
    module by module as they become final (`GradReducer`), BatchNorm statistics before
    evaluation and checkpoints."""

    def __init__(self, env: dist_.DistEnv, params: list[nn.Parameter]) -> None:
        super().__init__(env)
        self.reducer = dist_.GradReducer(params, env.world_size)

    def sync(self, net: nn.Module, aux: nn.Module) -> None:
        dist_.average_buffers(net, self.env.world_size)
        dist_.average_buffers(aux, self.env.world_size)
