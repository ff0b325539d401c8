"""The engine: one step (`step`), the epoch loop (`loop`), the run's position (`state`) and
checkpoints (`checkpoint`).

Per batch, `Step` runs ``rule.train_step(ctx, ...)`` under autocast (``precision`` bf16
or 16), averages gradients across ranks, checks the losses are finite and takes one optimizer
step over backbone and auxiliary parameters (through the gradient scaler for fp16), then
``rule.after_step``. `Trainer` wires a run built by `localearn.build.build_run` to its data,
learning-rate schedule, evaluation, logs and checkpoints. Evaluation uses the backbone's own
classifier only; auxiliary networks are training-only.

A run is resumable at every checkpoint: the data order and the augmentation of each sample are
functions of (seed, epoch, position) (`localearn.data.sampling`), so a run killed at any point
and resumed from its last checkpoint ends bitwise equal to an uninterrupted one on the same
hardware. See docs/engine.md.
"""

from importlib import import_module
from typing import Any

#: public names and the module that defines each; imported on first use, so that
#: `localearn.build` can use `localearn.engine.step` while `loop` uses `localearn.build`
_EXPORTS = {
    **dict.fromkeys(["RepeatsResult", "fit_repeats"], "repeats"),
    "TrainingInterrupted": "signals",
    **dict.fromkeys(["FitResult", "Trainer", "TrainingDiverged", "evaluate", "fit",
                     "warmup_cosine"],
                    "loop"),
    "RunState": "state",
    **dict.fromkeys(["EngineContext", "Step", "autocast"], "step"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'localearn.engine' has no attribute {name!r}")
    return getattr(import_module(f"localearn.engine.{_EXPORTS[name]}"), name)
