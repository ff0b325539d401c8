"""Repeats of one run over several seeds (``localearn fit --seeds 0,1,2``): the paper reports
the mean of three runs, the public code the best epoch; both are summarised."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localearn import distributed as dist_
from localearn.config import FitConfig
from localearn.engine import checkpoint as ckpt_io
from localearn.engine.checkpoint import atomic_write_text
from localearn.engine.loop import FitResult, Trainer
from localearn.errors import UserError
from localearn.interfaces import UpdateRule


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


def fit_repeats(cfg: FitConfig, *, make_rule: Callable[[], UpdateRule] | None = None,
                command: str | None = None) -> RepeatsResult:
    """Train ``cfg`` once per seed in ``cfg.seeds``, each into ``OUTPUT_DIR/seed-N`` (without
    an output folder, in a new ``runs/<...>-seeds`` folder); write ``OUTPUT_DIR/seeds.json``
    with every run's last and best accuracy and their mean and spread. ``make_rule``: a fresh
    rule object per seed, in place of building ``cfg.rule``."""
    seeds = list(cfg.seeds or [cfg.seed])
    parent = cfg.output_dir
    results = []
    for seed in seeds:
        one = cfg.model_copy(update={"seed": seed, "seeds": None, "output_dir":
                                     None if parent is None else parent / f"seed-{seed}"})
        trainer = Trainer(one, rule=make_rule() if make_rule else None, command=command)
        if parent is None:  # named once the first run knows its K
            parent = _new_parent(trainer)
            trainer.cfg = trainer.cfg.model_copy(update={"output_dir": parent / f"seed-{seed}"})
        results.append(trainer.fit())
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
