"""The run's position: a few numbers and the history so far, saved with every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunState:
    """``step`` optimizer steps done (counted from the batches delivered), ``batch_in_epoch``
    of them in ``epoch``; ``epoch_done`` once that epoch is evaluated; ``epoch_sums`` are its
    running train statistics (``[loss*n, correct, n, *local*n]``), ``history`` the rows of
    finished epochs and ``short`` the planned batches that finished epochs did not deliver
    (the schedule is shortened by as many)."""

    step: int = 0
    epoch: int = 1
    batch_in_epoch: int = 0
    epoch_done: bool = False
    epoch_sums: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    short: int = 0

    def start_epoch(self, epoch: int) -> None:
        """Enter ``epoch`` unless the state is already partway through it (a resume)."""
        if epoch != self.epoch or self.epoch_done:
            self.epoch, self.batch_in_epoch, self.epoch_done = epoch, 0, False
            self.epoch_sums = []

    def add_step(self, totals: list[float]) -> None:
        self.step += 1
        self.batch_in_epoch += 1
        sums = self.epoch_sums
        self.epoch_sums = [a + b for a, b in zip(sums, totals)] if sums else list(totals)

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epoch_sums": list(self.epoch_sums),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.epoch_done = state["batch_in_epoch"], state["epoch_done"]
        self.epoch_sums = list(state.get("epoch_sums", []))
        self.history = list(state.get("history", []))
        self.short = int(state.get("short", 0))
