"""The classification loss every rule computes, with the run's recipe applied.

Rules and heads call `cross_entropy(logits, targets)` where they would call
``torch.nn.functional.cross_entropy``. Outside a training step it is exactly that function;
inside one, the engine's `Step` sets the run's recipe (`using`), so every local loss and the
final loss of every rule get the same label smoothing, and soft targets (the (N, classes)
probabilities that mixup and cutmix make) are taken as torch's cross-entropy with class
probabilities takes them: ``-(targets * log_softmax(logits)).sum(1).mean()``, the meaning of
timm's ``SoftTargetCrossEntropy``. Soft targets carry their smoothing already (timm's
``Mixup`` smooths them), so smoothing is applied to hard labels only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

__all__ = ["LossRecipe", "cross_entropy", "current", "hard_labels", "using"]


@dataclass(frozen=True)
class LossRecipe:
    """How `cross_entropy` treats hard labels during a step: ``label_smoothing`` (0: none)."""

    label_smoothing: float = 0.0


_PLAIN = LossRecipe()
_RECIPE: ContextVar[LossRecipe | None] = ContextVar("localearn_loss_recipe", default=None)


def current() -> LossRecipe:
    """The recipe in force (the default, no smoothing, outside a training step)."""
    return _RECIPE.get() or _PLAIN


@contextlib.contextmanager
def using(recipe: LossRecipe) -> Iterator[None]:
    """Make ``recipe`` the one `cross_entropy` applies inside the ``with`` block."""
    token = _RECIPE.set(recipe)
    try:
        yield
    finally:
        _RECIPE.reset(token)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, classes) against class indices (N,), smoothed by
    the step's recipe, or against class probabilities (N, classes) as they are."""
    if targets.dim() == logits.dim() and targets.is_floating_point():
        return F.cross_entropy(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets, label_smoothing=current().label_smoothing)


def hard_labels(targets: Tensor) -> Tensor:
    """Class indices (N,): ``targets`` itself, or the most likely class of soft targets (for
    losses defined on labels only, such as supervised contrast, and for accuracy)."""
    return targets.argmax(1) if targets.dim() == 2 and targets.is_floating_point() else targets
