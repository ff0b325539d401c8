"""What a run reports: test accuracy (`evaluate`), the result of `fit` (`FitResult`), and the
summary saved as ``summary.json`` and printed at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from localearn import distributed as dist_
from localearn.engine.step import autocast
from localearn.errors import UserError
from localearn.interfaces import SplitNetwork, UpdateRule
from localearn.runlog import git_commit, parameters_by_role, peak_memory_mb, versions


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, device: torch.device, *,
             precision: str = "32", channels_last: bool = False,
             env: dist_.DistEnv | None = None) -> float:
    """Top-1 accuracy of the backbone's own classifier (summed over ranks when ``env`` is a
    multi-process job and each rank's loader holds its share of the test set)."""
    was_training = net.training
    net.eval()
    correct = total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = net(images)
        correct += (logits.argmax(1) == targets).sum().item()
        total += len(targets)
    net.train(was_training)
    if env is not None and env.enabled:
        correct, total = dist_.all_sum([correct, total], device, env)
    if total == 0:
        raise UserError("the test set delivered no samples: nothing to evaluate (check the "
                        "test data, or --test-limit)")
    return correct / total


@dataclass
class FitResult:
    """A finished run: the last epoch's test accuracy and train loss, the best test accuracy
    and its epoch (the public code reports the best; the paper the mean of 3 runs' last), the
    per-epoch ``history`` (the rows of ``metrics.jsonl``), and the trained parts: the split
    network (``net``; ``net.backbone`` is the plain model), the auxiliary networks (``aux``),
    the rule, the run's folder and its ``summary`` (``summary.json``)."""

    test_acc: float
    train_loss: float
    history: list[dict] = field(default_factory=list)
    step: int = 0
    checkpoint: Path | None = None
    best_test_acc: float = 0.0
    best_epoch: int = 0
    net: SplitNetwork | None = field(default=None, repr=False)
    aux: nn.Module | None = field(default=None, repr=False)
    rule: UpdateRule | None = field(default=None, repr=False)
    run_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict, repr=False)


def best_of(history: list[dict]) -> tuple[float, int]:
    """The best epoch of ``history`` (the earliest on a tie) and its test accuracy: chosen on
    validation accuracy when the run holds a validation set out, else on test accuracy (what
    the public code logs as its best)."""
    key = "val_acc" if history and "val_acc" in history[-1] else "test_acc"
    best = max(history, key=lambda r: (r.get(key, -1.0), -r["epoch"]))
    return best["test_acc"], best["epoch"]


def selected_on(history: list[dict]) -> str:
    """What the best epoch was chosen on: ``validation`` or ``test``."""
    return "validation" if history and "val_acc" in history[-1] else "test"


def validation_summary(trainer: Any, result: FitResult) -> dict[str, Any]:
    """The validation figures of a run that held a validation set out (else nothing)."""
    rows = result.history
    if not rows or "val_acc" not in rows[-1]:
        return {}
    best = next(r for r in rows if r["epoch"] == result.best_epoch)
    return {"best_val_acc": best["val_acc"], "last_val_acc": rows[-1]["val_acc"],
            "val_images": len(trainer.data.val), "val_digest": trainer.data.val_digest}


def run_summary(trainer: Any, result: FitResult) -> dict[str, Any]:
    """The run's summary (``summary.json``): last and best test accuracy (with the best's
    epoch), parameters by role, time, throughput, peak memory, and what reproduces it:
    the command, the settings, the versions and the project's git commit."""
    cfg = trainer.cfg
    rows = trainer.history
    train_time = sum(r["epoch_time"] for r in rows)
    images = sum(r.get("images", 0) for r in rows)
    return {
        "rule": trainer.rule.expression, "model": cfg.model, "k": trainer.net.k,
        "dataset": cfg.dataset, "seed": cfg.seed, "epochs": len(rows), "steps": trainer.step,
        "last_test_acc": result.test_acc, "best_test_acc": result.best_test_acc,
        "best_epoch": result.best_epoch, "best_selected_on": selected_on(rows),
        **validation_summary(trainer, result),
        "final_train_loss": result.train_loss,
        "parameters": parameters_by_role(trainer.net, trainer.rule.aux_groups(trainer.aux)),
        "train_time_s": train_time,  # the epochs' training time (all sessions of a resume)
        "wall_time_s": time.perf_counter() - trainer.started,  # this session, start to end
        "images": images,  # trained on, all processes
        "images_per_s": images / train_time if train_time > 0 else 0.0,
        "peak_mem_mb": max([peak_memory_mb(trainer.device),
                            *(r.get("peak_mem_mb", 0.0) for r in rows)]),
        "device": str(trainer.device), "world_size": trainer.env.world_size,
        "batches_short": trainer.state.short,
        "warnings": [r["warning"] for r in rows if r.get("warning")],
        "command": trainer.command,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "git": git_commit(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def best_text(s: dict[str, Any]) -> str:
    """The best epoch's test accuracy, saying what chose it."""
    if s.get("best_selected_on") == "validation":
        return (f"{s['best_test_acc']:.2%} at the best validation epoch {s['best_epoch']} "
                f"(validation {s['best_val_acc']:.2%})")
    return f"best {s['best_test_acc']:.2%} (epoch {s['best_epoch']})"


def summary_text(s: dict[str, Any]) -> str:
    """The summary's main figures in a few lines, for the console."""
    params = ", ".join(f"{role} {n / 1e6:.3g}M" for role, n in s["parameters"].items())
    return (f"summary: {s['rule']} on {s['model']} (K={s['k']}), {s['dataset']}, "
            f"{s['epochs']} epoch{'' if s['epochs'] == 1 else 's'}\n"
            f"  test accuracy: last {s['last_test_acc']:.2%}, {best_text(s)}\n"
            f"  parameters: {params}\n"
            f"  time: {s['train_time_s']:.1f}s training, {s['wall_time_s']:.1f}s wall; "
            f"{s['images_per_s']:.0f} img/s; peak memory {s['peak_mem_mb']:.0f} MiB")
