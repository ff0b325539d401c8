"""One training step: the only place that owns precision, loss scaling, gradient reduction, the
finiteness check and the optimizer step.

A rule sees none of these: `TrainStep` hands it an `EngineContext` (a `StepContext`) whose
``backward`` scales the loss when fp16 gradient scaling is on and whose ``grads_ready`` starts
the all-reduce of a finished module's gradients in a multi-process run. What the rule returns
stays on the device until the step's statistics are read in one host transfer.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from localearn import distributed as dist_
from localearn.errors import UserError
from localearn.interfaces import SplitNetwork, StepResult, UpdateRule

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
    """The engine's `StepContext`: fp16 loss scaling and per-module gradient reduction."""

    def __init__(self, scaler: torch.amp.GradScaler | None = None,
                 reducer: dist_.GradReducer | None = None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.reducer = reducer

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


def is_legacy(rule: UpdateRule) -> bool:
    """True for a rule whose ``train_step`` takes ``(net, images, targets)`` (no context)."""
    params = [p for p in inspect.signature(rule.train_step).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 3


def run_rule(rule: UpdateRule, ctx: EngineContext, net: SplitNetwork, images: Tensor,
             targets: Tensor, legacy: bool = False) -> StepResult:
    """``rule.train_step`` with the context; a legacy rule gets it lent for its
    ``self.backward`` / ``self.notify_grads_ready`` calls."""
    if not legacy:
        return check_step_result(rule, rule.train_step(ctx, net, images, targets), targets)
    rule._legacy_ctx = ctx
    try:
        result = rule.train_step(net, images, targets)  # type: ignore[call-arg]
    finally:
        rule._legacy_ctx = None
    return check_step_result(rule, result, targets)


def check_step_result(rule: UpdateRule, result: object, targets: Tensor) -> StepResult:
    """``result`` when it is a `StepResult` whose logits are one row per image; else a
    one-line `UserError` naming the rule and what ``train_step`` must return."""
    from localearn.registry import plugin_name

    who = f"rule {rule.expression!r} ({plugin_name(rule)})"
    want = ("localearn.StepResult(loss=..., logits=..., local_losses=[...]) holding detached "
            "tensors")
    if not isinstance(result, StepResult):
        raise UserError(f"{who}: train_step returned {type(result).__name__}, expected a "
                        f"{want}")
    logits = result.logits
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != len(targets):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UserError(f"{who}: train_step's StepResult.logits is {got}, expected the final "
                        f"classifier's logits, a tensor of shape ({len(targets)}, classes)")
    return result


def step_stats(result: StepResult, targets: Tensor) -> Tensor:
    """``[loss*n, correct, n, *local*n, non-finite count]`` as one float64 device tensor
    (``loss`` and each local loss may be tensors or, from an old rule, numbers)."""
    device = targets.device
    n = float(len(targets))
    losses = torch.stack([torch.as_tensor(v, device=device).detach().double().reshape(())
                          for v in (result.loss, *result.local_losses)])
    correct = (result.logits.argmax(1) == targets).sum().double()
    bad = (~torch.isfinite(losses)).sum().double()
    return torch.cat([losses[:1] * n, correct.view(1), losses.new_tensor([n]),
                      losses[1:] * n, bad.view(1)])


def optimizer_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer step, through the scaler when fp16 gradient scaling is on."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class DataEnd(Exception):
    """Raised by a later pipeline stage's step when the first stage's stream ended before the
    epoch's planned batches: the epoch ends there too."""


class NonFiniteLoss(Exception):
    """A loss of this step was NaN or infinite (the step was not applied)."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


class TrainStep:
    """Runs one batch: zero the gradients, the rule's forward and backward passes under
    autocast, the gradient all-reduce, one host read of the statistics (summed over ranks),
    the finiteness verdict, the optimizer step (through the scaler for fp16) and the rule's
    ``after_step``."""

    def __init__(self, rule: UpdateRule, net: SplitNetwork, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str = "32",
                 reducer: dist_.GradReducer | None = None,
                 env: dist_.DistEnv | None = None) -> None:
        self.rule, self.net, self.optimizer = rule, net, optimizer
        self.device, self.precision = device, precision
        self.reducer, self.env = reducer, env or dist_.DistEnv()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
        self.ctx = EngineContext(self.scaler, reducer)
        # a stop asked for on any rank (SIGINT, SIGTERM) travels with the step's statistics,
        # so every rank stops after the same step
        self.stop_vote = False
        self.stop_requested = False
        self.legacy = is_legacy(rule)
        if self.legacy:
            warnings.warn(f"{type(rule).__name__}.train_step(net, images, targets) is "
                          "deprecated: write train_step(ctx, net, images, targets) and call "
                          "ctx.backward / ctx.grads_ready (see docs/plugins.md)",
                          LegacyRuleWarning, stacklevel=3)

    def __call__(self, images: Tensor, targets: Tensor) -> list[float]:
        """Train on one batch; the global ``[loss*n, correct, n, *local*n]``. Raises
        `NonFiniteLoss` (on every rank) before the optimizer step if a loss is not finite.
        Afterwards ``stop_requested`` is True on every rank if any rank set ``stop_vote``."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.reducer is not None:
            self.reducer.start()
        try:
            with autocast(self.device, self.precision):
                result = run_rule(self.rule, self.ctx, self.net, images, targets, self.legacy)
        except ValueError as exc:
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            raise UserError(f"a batch of {len(targets)} image(s) cannot train the BatchNorm "
                            "layers (they need at least 2 values per channel); use "
                            "--batch-size 2 or more, with at least 2 training images per "
                            "process") from None
        if self.reducer is not None:
            self.reducer.finish()
        stats = step_stats(result, targets)
        stats = torch.cat([stats, stats.new_tensor([float(self.stop_vote)])])
        if self.env.enabled:
            torch.distributed.all_reduce(stats)
        totals = stats.tolist()  # the step's one host synchronisation
        self.stop_requested = totals.pop() > 0
        if totals[-1]:
            local = [result.loss, *result.local_losses]
            values = [float(v) for v in local if not torch.isfinite(torch.as_tensor(v))]
            raise NonFiniteLoss(values[0] if values else float("nan"))
        optimizer_step(self.scaler, self.optimizer)
        self.rule.after_step()
        return totals[:-1]
