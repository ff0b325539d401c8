"""Repeats of one run over several seeds (``localearn fit --seeds 0,1,2``): the paper reports
the mean of three runs, the public code the best epoch; both are summarised."""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localearn import distributed as dist_
from localearn.config import FitConfig
from localearn.engine import checkpoint as ckpt_io
from localearn.engine.checkpoint import atomic_write_text
from localearn.engine.loop import FitResult, Trainer
from localearn.errors import UserError
from localearn.interfaces import UpdateRule
from localearn.runlog import read_jsonl


@dataclass
class RepeatsResult:
    """Runs of one configuration that differ only in the seed."""

    seeds: list[int]
    results: list[FitResult]
    run_dir: Path | None = None  # the folder holding seed-N/ and seeds.json

    def stats(self, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation (0 for one run) of ``test_acc`` or
        ``best_test_acc`` over the seeds."""
        values = [getattr(r, key) for r in self.results]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _new_parent(trainer: Trainer) -> Path:
    """A new folder for a set of repeats, named like a run's with ``-seeds`` (rank 0 makes
    it)."""
    made = error = None
    if trainer.env.is_main:
        try:
            name = ckpt_io.run_name(trainer.rule.expression, trainer.cfg.model, trainer.net.k)
            made = ckpt_io.new_run_dir(f"{name}-seeds")
        except UserError as exc:
            error = str(exc)
    made, error = dist_.broadcast_object((made, error), trainer.env)
    if error:
        raise UserError(error)
    return made


#: settings that do not change what a run computes: two runs differing only in these agree
NOT_RESULTS = ("output_dir", "overwrite", "progress", "resume", "seeds", "workers", "log_every",
               "checkpoint_every", "keep_checkpoints", "tensorboard", "device", "allow_pipe")


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_RESULTS}


def check_same_settings(run_dir: Path, cfg: FitConfig) -> None:
    """Refuse a run folder made with other settings than ``cfg`` (its ``config.json``)."""
    try:
        saved = comparable(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return  # no settings saved: nothing to compare
    now = comparable(cfg.model_dump(mode="json"))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise UserError(f"{run_dir} holds a run made with other settings ({k} "
                        f"{saved.get(k)!r}, now {now.get(k)!r}); pick another --out, or "
                        "delete that folder")


def finished_result(run_dir: Path) -> FitResult:
    """The result of the finished run in ``run_dir``, read back from its ``summary.json`` and
    ``metrics.jsonl`` (not trained again)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    try:
        history = [row for row in read_jsonl(run_dir / "metrics.jsonl")
                   if isinstance(row, dict) and "test_acc" in row]
        last = history[-1] if history else {}
        test_acc = float(summary.get("last_test_acc", last["test_acc"]))
        best = float(summary.get("best_test_acc", max(r["test_acc"] for r in history)))
        best_epoch = int(summary.get("best_epoch", 0))
        train_loss = float(summary.get("final_train_loss", last.get("train_loss", 0.0)))
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"{run_dir} holds a finished run whose results cannot be read "
                        f"({type(exc).__name__}); delete that folder to train it again") \
            from None
    return FitResult(test_acc, train_loss, history, int(summary.get("steps", 0) or 0),
                     run_dir / "checkpoint.pt", best, best_epoch, run_dir=run_dir,
                     summary=summary)


def _state(run_dir: Path) -> str | None:
    """``"finished"``, ``"unfinished"`` or None for a seed's folder."""
    held = ckpt_io.held_run(run_dir) if run_dir.is_dir() else None
    return None if held is None else held[0]


def _rerun_hint(exc: KeyboardInterrupt, command: str | None, parent: Path | None,
                named: bool) -> None:
    """Point an interrupted repeat's message at the command that finishes every seed (the
    per-seed ``--resume`` hint would finish one seed and write no ``seeds.json``)."""
    message = getattr(exc, "message", None)
    if not message or command is None:
        return
    head = message.split("; continue with:")[0]
    again = command if named or parent is None else f"{command} --out {shlex.quote(str(parent))}"
    exc.message = (f"{head}; finish every seed (finished ones are kept, this one resumed) and "
                   f"write seeds.json with: {again}")


def fit_repeats(cfg: FitConfig, *, make_rule: Callable[[], UpdateRule] | None = None,
                command: str | None = None) -> RepeatsResult:
    """Train ``cfg`` once per seed in ``cfg.seeds``, each into ``OUTPUT_DIR/seed-N`` (without
    an output folder, in a new ``runs/<...>-seeds`` folder); write ``OUTPUT_DIR/seeds.json``
    with every run's last and best accuracy and their mean and spread. ``make_rule``: a fresh
    rule object per seed, in place of building ``cfg.rule``.

    Run again with the same settings (after an interruption, say), it finishes the set: a
    seed's finished run is read back, an unfinished one resumed from its newest checkpoint, a
    missing one trained (with ``overwrite``, every seed is trained anew)."""
    seeds = list(cfg.seeds or [cfg.seed])
    parent = cfg.output_dir
    named = parent is not None
    results = []
    for seed in seeds:
        folder = None if parent is None else parent / f"seed-{seed}"
        one = cfg.model_copy(update={"seed": seed, "seeds": None, "output_dir": folder})
        state = None if folder is None or cfg.overwrite else _state(folder)
        if state is not None:
            check_same_settings(folder, one)
        if state == "finished":
            results.append(finished_result(folder))
            continue
        if state == "unfinished":  # its newest checkpoint continues
            one = one.model_copy(update={"resume": "latest"})
        trainer = Trainer(one, rule=make_rule() if make_rule else None, command=command)
        if parent is None:  # named once the first run knows its K
            parent = _new_parent(trainer)
            trainer.cfg = trainer.cfg.model_copy(update={"output_dir": parent / f"seed-{seed}"})
        try:
            results.append(trainer.fit())
        except KeyboardInterrupt as exc:
            _rerun_hint(exc, command, parent, named)
            raise
    cfg = cfg.model_copy(update={"output_dir": parent})
    out = RepeatsResult(seeds, results, parent)
    if dist_.current_env().is_main:
        summary = {"seeds": seeds,
                   "test_acc": [r.test_acc for r in results],
                   "best_test_acc": [r.best_test_acc for r in results]}
        for key in ("test_acc", "best_test_acc"):
            mean, std = out.stats(key)
            summary[f"{key}_mean"], summary[f"{key}_std"] = mean, std
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.output_dir / "seeds.json", json.dumps(summary, indent=2))
    return out
