"""End-to-end BP across pipelined stages, on torch's own pipeline schedules.

On ``fit --stages N`` BP runs as one pipeline (`UpdateRule.stage_lockstep`): every stage trains
the same batch in the same step. The batch is cut into ``--microbatches`` M equal microbatches;
stage s runs its modules (`StepContext.modules`) as a `torch.distributed.pipelining`
``PipelineStage`` over the process group of its replica's stages (`StepContext.stage_place`),
and ``ScheduleGPipe`` (every forward pass, then every backward pass) or ``Schedule1F1B`` (one
forward, one backward in the steady state; at most N microbatches' activations held) moves the
activations forward and their gradients back. The last stage takes each microbatch's mean
cross-entropy; each stage's gradients are the sum over the microbatches divided by M, the
gradient of the batch's mean loss. BatchNorm normalises each microbatch on its own, so the step
equals one-process BP over the same M microbatches (`accumulate`), not over the whole batch.

How long each stage computes (its chunks' forward and backward passes) is timed; the rest of
its step it waited for other stages, which it reports (`StepContext.add_wait`) for the idle
fraction of ``bench --stages``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from localearn.context import StagePlace, StepContext, StepResult
from localearn.errors import UserError
from localearn.interfaces import SplitNetwork
from localearn.losses import cross_entropy

SCHEDULES = {"gpipe": ScheduleGPipe, "one_f_one_b": Schedule1F1B}


class _TimedStage(PipelineStage):
    """A ``PipelineStage`` that adds the time of its forward and backward chunks up."""

    compute = 0.0

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.compute += time.perf_counter() - start

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.compute += time.perf_counter() - start


def split(batch: Tensor, microbatches: int, what: str) -> list[Tensor]:
    """``batch`` in ``microbatches`` equal pieces along its first dimension; a size they do not
    divide is one line."""
    if len(batch) % microbatches:
        raise UserError(f"--microbatches {microbatches} does not divide a batch of "
                        f"{len(batch)} {what} into equal microbatches")
    return list(batch.split(len(batch) // microbatches))


class StagePipe:
    """This stage's ``PipelineStage`` and schedule, made once per process (the modules it
    runs are the network's own: they share its parameters)."""

    def __init__(self, net: SplitNetwork, modules: range, place: StagePlace,
                 microbatches: int, schedule: str) -> None:
        self.modules, self.place, self.microbatches = modules, place, microbatches
        self.submod = nn.Sequential(*[net.local_modules[i] for i in modules])
        self.stage = _TimedStage(self.submod, place.index, place.count, place.device,
                                 group=place.group)
        self.schedule = SCHEDULES[schedule](self.stage, microbatches, loss_fn=cross_entropy,
                                            scale_grads=True)

    def step(self, ctx: StepContext, images: Tensor, targets: Tensor) -> StepResult:
        m, place = self.microbatches, self.place
        kw: dict[str, Any] = {"arg_mbs": [(x,) for x in split(images, m, "images")]
                              if place.first else [()] * m, "kwarg_mbs": [{}] * m}
        losses: list[Tensor] = []
        if place.last:
            kw.update(target_mbs=split(targets, m, "targets"), losses=losses)
        self.stage.compute = 0.0
        start = time.perf_counter()
        out = self.schedule.step(**kw)
        ctx.add_wait(max(0.0, time.perf_counter() - start - self.stage.compute))
        ctx.grads_ready(self.submod.parameters())
        if not place.last:
            return StepResult(loss=None, logits=None)
        loss = torch.stack([v.detach().float() for v in losses]).mean()
        return StepResult(loss=loss, logits=out.detach())


def accumulate(ctx: StepContext, net: SplitNetwork, logits_of: Any, images: Tensor,
               targets: Tensor) -> StepResult:
    """One process over ``ctx.microbatches`` equal microbatches: each microbatch's mean loss
    back-propagated, the summed gradients divided by their number (as a pipelined stage does),
    the batch's loss the mean of theirs."""
    m = ctx.microbatches
    losses, logits = [], []
    for x, y in zip(split(images, m, "images"), split(targets, m, "targets")):
        out = logits_of(net, x)
        loss = cross_entropy(out, y)
        ctx.backward(loss)
        losses.append(loss.detach())
        logits.append(out.detach())
    params = [p for p in net.parameters() if p.grad is not None]
    for p in params:
        p.grad.div_(m)
    ctx.grads_ready(params)
    return StepResult(loss=torch.stack(losses).float().mean(), logits=torch.cat(logits))


def alone(ctx: StepContext, net: SplitNetwork, images: Tensor, targets: Tensor) -> StepResult:
    """Some modules as a stage of their own (the stage balancer's timing): their forward pass
    from ``ctx.enter``, and their backward pass from the loss (the last module) or from what a
    next stage would send back."""
    mine = ctx.modules(net.k)
    x = images
    for i in mine:
        x = net.local_modules[i](ctx.enter(i, x))
    if mine.stop == net.k:
        loss = cross_entropy(x, targets)
        ctx.backward(loss)
        return StepResult(loss=loss.detach(), logits=x.detach())
    ctx.backward_from(x, ctx.take_back(x))
    return StepResult(loss=None, logits=None)
