"""One training step, whatever the parallelism: the only place that zeroes gradients, enters
autocast, calls the rule's ``train_step``, reduces gradients, reads the statistics, decides
finiteness, steps the optimizer and calls ``after_step``.

A rule sees none of these: `Step` hands it an `EngineContext` (a `StepContext`) whose
``backward`` scales the loss when fp16 gradient scaling is on, whose ``grads_ready`` starts the
all-reduce of a finished module's gradients in a multi-process run, and whose stage primitives
go to the parallel strategy (`localearn.engine.parallel`). What the rule returns stays on the
device until the step's statistics are read in one host transfer.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from localearn import distributed as dist_
from localearn import losses
from localearn.context import StagePlace
from localearn.engine.parallel import DataEnd, NonFiniteLoss, Single
from localearn.engine.recipe import StepRecipe
from localearn.errors import UserError
from localearn.interfaces import SplitNetwork, StepResult, UpdateRule

__all__ = ["AMP_DTYPES", "DataEnd", "EngineContext", "LegacyRuleWarning", "NonFiniteLoss", "Step",
           "autocast", "check_step_result", "optimizer_step", "step_stats"]

AMP_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


class LegacyRuleWarning(DeprecationWarning):
    """A rule still implements ``train_step(net, images, targets)``."""


warnings.simplefilter("default", LegacyRuleWarning)  # shown once per rule class


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 for ``precision`` "bf16"/"16"; a no-op for "32"."""
    if precision not in AMP_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


class EngineContext:
    """The engine's `StepContext`: fp16 loss scaling, per-module gradient reduction, and the
    strategy's transport between pipelined stages (pass-throughs in one process)."""

    def __init__(self, scaler: torch.amp.GradScaler | None = None,
                 reducer: dist_.GradReducer | None = None,
                 strategy: Single | None = None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.reducer = reducer
        self.strategy = strategy or Single()
        self.stage_mode = self.strategy.stage_mode

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward(retain_graph=retain_graph)

    def backward_from(self, outputs: Tensor | Sequence[Tensor], grads: Tensor | Sequence[Tensor],
                      inputs: Sequence[Tensor] | None = None, *,
                      retain_graph: bool = False) -> None:
        # the gradients came out of `backward`, so they carry the loss scale already
        torch.autograd.backward(outputs, grads, inputs=inputs, retain_graph=retain_graph)

    def grads_ready(self, params: Iterable[nn.Parameter]) -> None:
        if self.reducer is not None:
            self.reducer.announce(params)

    def modules(self, k: int) -> range:
        return self.strategy.modules(k)

    def enter(self, index: int, x: Tensor) -> Tensor:
        return self.strategy.enter(index, x)

    def leave(self, index: int, output: Tensor) -> None:
        self.strategy.leave(index, output)

    def send_back(self, grad: Tensor) -> None:
        self.strategy.send_back(grad)

    def take_back(self, like: Tensor) -> Tensor:
        return self.strategy.take_back(like)

    @property
    def microbatches(self) -> int:
        return self.strategy.microbatches

    def stage_place(self) -> StagePlace | None:
        return self.strategy.stage_place()

    def add_wait(self, seconds: float) -> None:
        self.strategy.add_wait(seconds)


def is_legacy(rule: UpdateRule) -> bool:
    """True for a rule whose ``train_step`` takes ``(net, images, targets)`` (no context)."""
    params = [p for p in inspect.signature(rule.train_step).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 3


def run_rule(rule: UpdateRule, ctx: EngineContext, net: SplitNetwork, images: Tensor,
             targets: Tensor, legacy: bool = False) -> object:
    """``rule.train_step`` with the context; a legacy rule gets it lent for its
    ``self.backward`` / ``self.notify_grads_ready`` calls."""
    if not legacy:
        return rule.train_step(ctx, net, images, targets)
    with rule.legacy_context(ctx):
        return rule.train_step(net, images, targets)  # type: ignore[call-arg]


def check_step_result(rule: UpdateRule, result: object, targets: Tensor,
                      holds_last: bool = True) -> StepResult:
    """``result`` when it is a `StepResult` whose logits are one row per image (None on a
    pipelined stage without the last module); else a one-line `UserError` naming the rule and
    what ``train_step`` must return."""
    if not isinstance(result, StepResult):
        raise UserError(f"{_who(rule)}: train_step returned {type(result).__name__}, expected "
                        "a localearn.StepResult(loss=..., logits=..., local_losses=[...]) "
                        "holding detached tensors")
    logits = result.logits
    if logits is None and not holds_last:
        return result
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != len(targets):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UserError(f"{_who(rule)}: train_step's StepResult.logits is {got}, expected the "
                        "final classifier's logits, a tensor of shape "
                        f"({len(targets)}, classes)")
    return result


def _who(rule: UpdateRule) -> str:
    """The rule as error lines name it (reads the installed entry points: errors only, never
    on every step)."""
    from localearn.registry import plugin_name

    return f"rule {rule.expression!r} ({plugin_name(rule)})"


def step_stats(result: StepResult, targets: Tensor, offset: int = 0, slots: int | None = None,
               stop: bool = False) -> Tensor:
    """``[loss*n, correct, n, local_0*n .. local_{slots-1}*n, non-finite count, stop]`` as one
    float64 device tensor: the rule's local losses (tensors or, from an old rule, numbers)
    from slot ``offset`` on, the first three zero when the step has no final loss (a pipelined
    stage without the last module)."""
    device = targets.device
    n = float(len(targets))
    local = [torch.as_tensor(v, device=device).detach().double().reshape(())
             for v in result.local_losses]
    slots = len(local) if slots is None else slots
    v = torch.zeros(3 + slots + 2, dtype=torch.float64, device=device)
    values = local
    if result.logits is not None and result.loss is not None:
        loss = torch.as_tensor(result.loss, device=device).detach().double().reshape(())
        v[0] = loss * n
        # mixed (soft) targets count against their most likely class
        v[1] = (result.logits.argmax(1) == losses.hard_labels(targets)).sum().double()
        v[2] = n
        values = [loss, *local]
    if local:
        v[3 + offset:3 + offset + len(local)] = torch.stack(local) * n
    if values:
        v[-2] = (~torch.isfinite(torch.stack(values))).sum().double()
    v[-1] = float(stop)
    return v


def optimizer_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer step, through the scaler when fp16 gradient scaling is on."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class Step:
    """Runs one batch, whatever the parallelism: the strategy's batch (a later pipelined stage
    receives it), zero the gradients, the rule's ``train_step`` under autocast, the gradient
    reduction, the statistics with the stop vote, the finiteness verdict, the optimizer step
    (through the scaler for fp16), what the strategy does after it, and ``after_step``.
    ``recipe`` (`localearn.engine.recipe`): the batch's mixup and RandAugment (where the
    strategy reads data), the loss settings of the rule's cross-entropy, gradient clipping
    between the reduction and the optimizer step, the weight average after it."""

    def __init__(self, rule: UpdateRule, net: SplitNetwork, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str = "32",
                 strategy: Single | None = None, recipe: StepRecipe | None = None) -> None:
        self.rule, self.net, self.optimizer = rule, net, optimizer
        self.recipe = recipe or StepRecipe()
        self.device, self.precision = device, precision
        self.strategy = strategy or Single()
        self.reducer = self.strategy.reducer
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
        self.ctx = EngineContext(self.scaler, self.reducer, self.strategy)
        # a stop asked for on any process (SIGINT, SIGTERM) travels with the step's
        # statistics, so every process stops after the same step
        self.stop_vote = False
        self.legacy = is_legacy(rule)
        if self.legacy:
            warnings.warn(f"{type(rule).__name__}.train_step(net, images, targets) is "
                          "deprecated: write train_step(ctx, net, images, targets) and call "
                          "ctx.backward / ctx.grads_ready (see docs/plugins.md)",
                          LegacyRuleWarning, stacklevel=3)

    @property
    def stop_requested(self) -> bool:
        """True on every process once any process voted to stop (see ``stop_vote``)."""
        return self.strategy.stop_requested

    def __call__(self, images: Tensor, targets: Tensor) -> list[float]:
        """Train on one batch; the global ``[loss*n, correct, n, *local*n]`` (of an earlier
        step on pipelined stages). Raises `NonFiniteLoss` before the optimizer step if a loss
        is not finite (on stages, a stage skips its step and all raise some steps later);
        `DataEnd` when a later stage learns the epoch's stream ended."""
        strategy, recipe = self.strategy, self.recipe
        if recipe.batch is not None and strategy.reads_data:
            images, targets = recipe.batch(images, targets)
        images, targets = strategy.begin(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.reducer is not None:
            self.reducer.start()
        try:
            with autocast(self.device, self.precision), losses.using(recipe.loss):
                result = run_rule(self.rule, self.ctx, self.net, images, targets, self.legacy)
        except ValueError as exc:
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            raise UserError(f"a batch of {len(targets)} image(s) cannot train the BatchNorm "
                            "layers (they need at least 2 values per channel); use "
                            "--batch-size 2 or more, with at least 2 training images per "
                            "process") from None
        check_step_result(self.rule, result, targets, strategy.holds_last(self.net.k))
        if self.reducer is not None:
            self.reducer.finish()
        offset, slots = strategy.local_slots(self.net.k, len(result.local_losses))
        stats = step_stats(result, targets, offset, slots, self.stop_vote)
        try:
            may_step = strategy.verdict(stats)
        except NonFiniteLoss:
            raise NonFiniteLoss(first_nonfinite_loss(result)) from None
        if may_step:
            if recipe.clip_grad is not None:
                if self.scaler.is_enabled():
                    self.scaler.unscale_(self.optimizer)
                recipe.clip()
            optimizer_step(self.scaler, self.optimizer)
        strategy.after_optimizer()
        if may_step:
            if recipe.ema is not None:
                recipe.ema.update(self.net)
            self.rule.after_step()
        return strategy.finish(stats)

    def drain(self) -> list[float] | None:
        """Before evaluation, checkpoints and the end of an epoch: what the rule left in flight
        (`UpdateRule.flush`), then the statistics not reported yet (None: none)."""
        with losses.using(self.recipe.loss):
            self.rule.flush(self.ctx)
        return self.strategy.drain()

    def sync(self, aux: nn.Module) -> None:
        """Every process's copy of the run made current (after `drain`)."""
        self.strategy.sync(self.net, aux)
        if self.recipe.ema is not None:  # the average's BatchNorm statistics too
            self.strategy.sync(self.recipe.ema.module, nn.ModuleList())


def first_nonfinite_loss(result: StepResult) -> float:
    """The first loss of ``result`` that is NaN or infinite (NaN when all are finite: the
    verdict came from another process or an earlier step)."""
    values = [float(v) for v in [result.loss, *result.local_losses]
              if v is not None and not torch.isfinite(torch.as_tensor(v))]
    return values[0] if values else float("nan")
