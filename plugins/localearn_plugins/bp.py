"""BP: plain end-to-end back-propagation, the baseline every local rule is measured against.

``bp(checkpoint=...)`` is the same training with activation checkpointing: the backbone's units
are grouped into contiguous segments, and every segment but the last keeps only its input in the
forward pass; its activations are recomputed in the backward pass
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``). The last segment (its units
and the classifier) runs as in plain bp: its recomputation would come right away.

- ``none`` (default): no recomputation, plain bp;
- ``unit``: every unit (the stem, each residual block) its own segment;
- ``sqrt``: about sqrt(units) segments (resnet32, 16 units: 4; resnet110, 55 units: 7);
- ``N``, an integer from 2 to the number of units: N segments.

Segment sizes differ by at most one unit, the larger segments last (early units carry the
largest activations). The forward pass, the gradients and the BatchNorm buffers are those of
plain bp: a recomputation runs BatchNorm in training mode again, which would update its running
statistics a second time, so every buffer of the segment is put back as the forward pass left it
once the recomputation ends. The random state is restored for the recomputation (checkpoint's
default), so dropout and stochastic depth draw the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from localearn.errors import UserError
from localearn.interfaces import SplitNetwork, StepContext, StepResult, UpdateRule, cross_entropy

VALID = ("none (no recomputation), unit (every backbone unit its own segment), sqrt (about "
         "sqrt(units) segments) or an integer N >= 2 (N segments)")


def parse_checkpoint(value: Any) -> str | int | None:
    """``bp``'s ``checkpoint`` option: None, ``"unit"``, ``"sqrt"`` or a segment count >= 2;
    anything else is a one-line `UserError` listing the valid values."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() in ("unit", "sqrt"):
        return value.strip().lower()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return value
    raise UserError(f"bad value {value!r} for option 'checkpoint' of rule 'bp': valid values "
                    f"are {VALID}")


class CheckpointValue:
    """The type of ``bp``'s ``checkpoint`` option, named after its grammar so that
    ``localearn rules bp`` shows it; rule expressions are validated by `parse_checkpoint`."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(parse_checkpoint)


# the listing prints a class option's type by its name
CheckpointValue.__name__ = CheckpointValue.__qualname__ = "none|unit|sqrt|N"

SCHEDULES = ("one_f_one_b", "gpipe")


def parse_schedule(value: Any) -> str | None:
    """``bp``'s ``schedule`` option: None (no pipeline) or one of `SCHEDULES`; anything else
    is a one-line `UserError` listing the valid values."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() in SCHEDULES:
        return value.strip().lower()
    raise UserError(f"bad value {value!r} for option 'schedule' of rule 'bp': valid values are "
                    "none, one_f_one_b (torch's Schedule1F1B) or gpipe (ScheduleGPipe)")


class ScheduleValue:
    """The type of ``bp``'s ``schedule`` option (named after its values for the listing)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(parse_schedule)


ScheduleValue.__name__ = ScheduleValue.__qualname__ = "none|one_f_one_b|gpipe"


def segment_bounds(num_units: int, mode: str | int | None) -> list[int]:
    """Where the segments of ``num_units`` units start, and the end: ``[0, ..., num_units]``
    (one segment, nothing recomputed, for ``none``). A count above ``num_units`` is a
    `UserError`."""
    if mode is None or num_units < 2:
        return [0, num_units]
    if mode == "unit":
        n = num_units
    elif mode == "sqrt":
        n = min(num_units, max(2, round(math.sqrt(num_units))))
    else:
        n = int(mode)
        if n > num_units:
            raise UserError(f"bp(checkpoint={n}) asks for {n} segments, but this model has "
                            f"{num_units} units; valid segment counts are 2..{num_units} "
                            "(or checkpoint=unit)")
    small, extra = divmod(num_units, n)
    sizes = [small] * (n - extra) + [small + 1] * extra
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return bounds


class _PutBuffersBack:
    """Entered around a segment's recomputation: every buffer of ``modules`` (BatchNorm's
    running statistics and batch count) ends as it was when the recomputation began, i.e. as
    the forward pass left it, even when checkpoint stops the recomputation early."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(b, b.detach().clone()) for m in self.modules for b in m.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buffer, old in self.saved:
                buffer.copy_(old)
        self.saved = []


def _run(pieces: list[nn.Module], x: Tensor) -> Tensor:
    for piece in pieces:
        x = piece(x)
    return x


class BP(UpdateRule):
    """End-to-end back-propagation (one module, K=1).

    Option ``checkpoint``: none|unit|sqrt|N, activation checkpointing by segments of units
    (see the module docstring); ``none``, the default, is plain bp. Option ``schedule``:
    one_f_one_b (1F1B) or gpipe, torch's pipeline schedule on ``--stages``
    (`bp_pipeline`); with it the network may be cut into any K modules (default: one per
    unit), which are only where the stages may cut it: the training is end to end whatever
    K. ``--microbatches M`` cuts
    each batch into M microbatches, on stages or, with their gradients accumulated, in one
    process."""

    description = ("end-to-end back-propagation through the whole network (K=1); "
                   "checkpoint=unit|sqrt|N recomputes activations in the backward pass; on "
                   "--stages, one pipeline under torch's schedule=one_f_one_b|gpipe (any K)")

    stage_lockstep = True  # on --stages: one pipeline, every stage on the same batch
    end_to_end = True  # --clip-grad clips the whole model's norm

    def __init__(self, checkpoint: CheckpointValue = None,  # type: ignore[assignment]
                 schedule: ScheduleValue = None) -> None:  # type: ignore[assignment]
        super().__init__()
        self.checkpoint = parse_checkpoint(checkpoint)
        self.schedule = parse_schedule(schedule)
        self._pipe: Any = None

    def num_modules(self, requested: int | None, num_units: int) -> int:
        """K=1; with a ``schedule``, any K (default: one module per unit): the modules are
        only where ``--stages`` may cut the network, the training is end to end whatever K."""
        if self.schedule is not None:
            return super().num_modules(requested, num_units)
        if requested not in (None, 1):
            raise UserError(f"rule 'bp' trains end to end, so K must be 1 (got K={requested}); "
                            "drop --k or use a local rule such as dgl (or pipeline it: "
                            "bp(schedule=one_f_one_b) with --stages)")
        return 1

    def stage_check(self, ranges: list[range], mode: str, precision: str) -> str | None:
        if self.schedule is None:
            return ("bp runs on stages as one pipeline under torch's schedules: name one, "
                    "bp(schedule=one_f_one_b) or bp(schedule=gpipe)")
        if precision == "16":
            return ("bp on stages runs torch's pipeline schedules, which take no fp16 loss "
                    "scaling; use --precision bf16 or 32")
        if self.checkpoint is not None:
            return (f"{self.expression} recomputes segments of the whole network; drop "
                    "checkpoint=... on stages")
        return None

    def microbatch_check(self, microbatches: int, stages: int) -> str | None:
        if self.schedule == "one_f_one_b" and 1 < stages and microbatches < stages:
            return (f"{self.expression} on {stages} stages needs at least {stages} "
                    "microbatches (1F1B keeps one in flight per stage); or schedule=gpipe")
        return None

    def configure(self, net: SplitNetwork) -> None:
        segment_bounds(len(net.units), self.checkpoint)  # a segment count the model allows

    def compile_targets(self, net: SplitNetwork, aux: nn.Module) -> list[nn.Module]:
        if self.checkpoint is None:
            return super().compile_targets(net, aux)
        return list(net.local_modules[0])  # run piece by piece: each unit, the classifier

    def segments(self, net: SplitNetwork) -> list[list[nn.Module]]:
        """The network's pieces (its units, then the classifier) grouped into the segments
        run one after another; all but the last are checkpointed."""
        pieces = [m for module in net.local_modules for m in module]
        num_units = len(net.units)
        bounds = segment_bounds(num_units, self.checkpoint)
        groups = [pieces[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        groups[-1] = groups[-1] + pieces[num_units:]
        return groups

    def logits(self, net: SplitNetwork, images: Tensor) -> Tensor:
        """The logits, as ``net(images)``; with checkpointing, every segment but the last
        keeps only its input for the backward pass."""
        if self.checkpoint is None or not torch.is_grad_enabled():
            return net(images)
        x, segments = images, self.segments(net)
        for pieces in segments[:-1]:
            def contexts(pieces: list[nn.Module] = pieces) -> tuple[Any, Any]:
                return contextlib.nullcontext(), _PutBuffersBack(pieces)

            x = checkpoint(_run, pieces, x, use_reentrant=False, context_fn=contexts)
        return _run(segments[-1], x)

    def train_step(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                   targets: Tensor) -> StepResult:
        place = ctx.stage_place()
        if place is not None or ctx.modules(net.k) != range(net.k) or ctx.microbatches > 1:
            from localearn_plugins import bp_pipeline  # torch's pipelining, loaded when used

            if place is not None:  # a lockstep pipeline over torch's schedules
                if self._pipe is None:
                    self._pipe = bp_pipeline.StagePipe(net, ctx.modules(net.k), place,
                                                       ctx.microbatches, self.schedule)
                return self._pipe.step(ctx, images, targets)
            if ctx.modules(net.k) != range(net.k):  # timed as a stage of its own
                return bp_pipeline.alone(ctx, net, images, targets)
            return bp_pipeline.accumulate(ctx, net, self.logits, images, targets)
        logits = self.logits(net, images)
        loss = cross_entropy(logits, targets)
        ctx.backward(loss)
        ctx.grads_ready(net.parameters())
        return StepResult(loss=loss.detach(), logits=logits.detach())
