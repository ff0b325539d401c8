"""What a rule's `train_step` gets from the engine (`StepContext`) and what it returns
(`StepResult`).

A rule runs its modules through the context: ``ctx.modules(K)`` are the modules this process
trains (all K in one process, a contiguous range on a pipelined stage), ``ctx.enter`` gives a
module its input, ``ctx.leave`` hands a module's output on. Rules whose losses reach back across
modules (MLAAN's cascades) send the gradient at the input of their first module back with
``ctx.send_back`` and take what the next stage sent with ``ctx.take_back``. In one process every
one of these is a pass-through, so a rule written this way runs unchanged on one process, on
data-parallel processes and on pipelined stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class StepResult:
    """What one training step reports, as detached tensors (the engine reads them on the host
    once per step, not once per module): the final classifier's loss and logits, and one
    local loss per auxiliary objective.

    On a pipelined stage that does not hold the last module, ``loss`` and ``logits`` are None
    and ``local_losses`` holds the losses of this stage's modules, in order."""

    loss: Tensor | None
    logits: Tensor | None
    local_losses: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class StagePlace:
    """Where this process stands in a lockstep pipeline (`UpdateRule.stage_lockstep`): its
    stage ``index`` of ``count``, the process ``group`` of this replica's stages (in stage
    order: group rank = stage index) and the ``device`` it trains on."""

    index: int
    count: int
    group: Any
    device: torch.device

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@runtime_checkable
class StepContext(Protocol):
    """What the engine offers a rule during `UpdateRule.train_step`.

    The engine owns precision, loss scaling, gradient reduction and the transport between
    pipelined stages; a rule says what to back-propagate, when a group of parameters has its
    final gradient, and where its modules' inputs and outputs go."""

    #: ``"sync"`` or ``"async"``: on pipelined stages, whether what the next stage sends back
    #: (`take_back`) and the units read from other stages may arrive one step late
    stage_mode: str
    #: how many equal microbatches the run asks a rule that takes them to cut each batch into
    #: (``--microbatches``; 1 for every other rule)
    microbatches: int

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> None:
        """Back-propagate a scalar loss (scaled first when fp16 gradient scaling is on)."""

    def backward_from(self, outputs: Tensor | Sequence[Tensor], grads: Tensor | Sequence[Tensor],
                      inputs: Sequence[Tensor] | None = None, *,
                      retain_graph: bool = False) -> None:
        """Continue a backward pass from ``outputs`` with gradients ``grads`` that came out of
        an earlier `backward` (so they already carry any loss scale); with ``inputs``, only
        those tensors receive gradient (``torch.autograd.backward``'s meaning)."""

    def grads_ready(self, params: Iterable[nn.Parameter]) -> None:
        """``params`` get no more gradient in this step (multi-process training starts their
        all-reduce now, overlapping the rest of the step)."""

    def modules(self, k: int) -> range:
        """The modules of 0..k-1 this process trains: all of them in one process."""

    def enter(self, index: int, x: Tensor) -> Tensor:
        """Module ``index``'s input: ``x`` (the previous module's output, or the images), or,
        for the first module of a later pipelined stage, the output the previous stage sent."""

    def leave(self, index: int, output: Tensor) -> None:
        """Module ``index``'s output, before its backward pass: sent on to the next stage when
        module ``index`` is this stage's last (nothing happens otherwise)."""

    def send_back(self, grad: Tensor) -> None:
        """The gradient at the input of this process's first module, for the previous stage
        (whose `take_back` returns it). Only a later pipelined stage has a previous stage."""

    def take_back(self, like: Tensor) -> Tensor:
        """The next gradient the next stage sent back with `send_back` (shaped like ``like``,
        the output of this stage's last module), in the order it was sent."""

    def stage_place(self) -> StagePlace | None:
        """On a lockstep pipeline, where this process stands (the rule moves activations and
        gradients between stages itself, over ``group``); None otherwise."""

    def add_wait(self, seconds: float) -> None:
        """Seconds of this step a lockstep rule spent blocked on other stages (for the idle
        fraction `localearn bench --stages` reports)."""


class PlainContext:
    """A `StepContext` without scaling, reduction or stages: for calling a rule outside the
    engine (tests, notebooks, examples)."""

    stage_mode = "sync"
    microbatches = 1

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> None:
        loss.backward(retain_graph=retain_graph)

    def backward_from(self, outputs, grads, inputs=None, *, retain_graph: bool = False) -> None:
        torch.autograd.backward(outputs, grads, inputs=inputs, retain_graph=retain_graph)

    def grads_ready(self, params: Iterable[nn.Parameter]) -> None:
        pass

    def modules(self, k: int) -> range:
        return range(k)

    def enter(self, index: int, x: Tensor) -> Tensor:
        return x

    def leave(self, index: int, output: Tensor) -> None:
        pass

    def send_back(self, grad: Tensor) -> None:
        raise RuntimeError("send_back: one process has no previous stage")

    def take_back(self, like: Tensor) -> Tensor:
        raise RuntimeError("take_back: one process has no next stage")

    def stage_place(self) -> StagePlace | None:
        return None

    def add_wait(self, seconds: float) -> None:
        pass
