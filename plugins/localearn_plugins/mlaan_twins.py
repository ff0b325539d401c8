"""MLAAN's EMA twins: when they follow their real blocks, and which of them do.

``twins`` names one of three readings of eq. (7), ``twin = r * twin + (1 - r) * real``:

- ``paper`` (the default): every twin, after every optimizer step (`MLAAN.after_step`), so it
  averages the weights the step just made; parameters by linear interpolation, BatchNorm
  buffers copied from the real block.
- ``public_last``: what the public CIFAR code (its MLAAN, DGL+MLAAN and InfoPro+MLAAN files)
  runs: only the twins of the last leap-augmented module (the module K-2, which ends the last
  cascade) move, once per step, before the optimizer step, parameters only; every other twin
  stays at its initial weights for good.
- ``public_all``: what the public LAM-only and ImageNet code runs: every twin, once per step,
  before the optimizer step, parameters only.

"Before the optimizer step" is the end of `MLAAN.train_step`: after every backward pass of
the step (which changes no parameter) and before the engine's optimizer step, so the twins
average the weights from before this step's update, one step behind the ``paper`` reading. As
in the public code, the update also happens on a step the engine then skips (a non-finite
loss).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

TwinMode = Literal["paper", "public_last", "public_all"]
TWIN_MODES: tuple[str, ...] = ("paper", "public_last", "public_all")


def check_mode(mode: str) -> str:
    """``mode`` if it names a reading, else a ValueError naming the valid ones."""
    if mode not in TWIN_MODES:
        raise ValueError(f"twins must be one of {', '.join(TWIN_MODES)} (got {mode!r})")
    return mode


def twin_key(block: int, own: bool) -> str:
    """The key of a twin of real unit ``block`` in the rule's ``twins``: twins of one real
    block are one module (``str(block)``), except the last LAM's own twin under
    ``public_last`` (``own``), which moves while the shared one stays put."""
    return f"{block}_last" if own else str(block)


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], rate: float,
               buffers: bool) -> None:
    """``twin = rate * twin + (1 - rate) * real`` for each ``(twin, real)`` pair's parameters;
    with ``buffers``, the real block's buffers (BatchNorm statistics) are copied too."""
    for twin, real in pairs:
        for t, r in zip(twin.parameters(), real.parameters(), strict=True):
            t.lerp_(r, 1.0 - rate)
        if buffers:
            for t, r in zip(twin.buffers(), real.buffers(), strict=True):
                t.copy_(r)


def keys_to_update(mode: str, keys_by_module: dict[int, list[str]], last: int | None,
                   modules: Iterable[int]) -> list[str]:
    """The twins one of the public readings moves at the end of a step on ``modules`` (a
    pipelined stage's own, or all): ``public_last`` those of the module ``last`` (the last one
    with a leap-augmented module) if it is among ``modules``; ``public_all`` those of every
    module in ``modules``; each key once."""
    if mode == "public_last":
        chosen = [last] if last is not None and last in set(modules) else []
    elif mode == "public_all":
        chosen = list(modules)
    else:
        return []
    return list(dict.fromkeys(k for i in chosen for k in keys_by_module.get(i, [])))
