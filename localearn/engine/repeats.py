"""Repeats of one run over several seeds (``localearn fit --seeds 0,1,2``): the paper reports
the mean of three runs, the public code the best epoch; both are summarised."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from localearn import distributed as dist_
from localearn.config import FitConfig
from localearn.engine.checkpoint import atomic_write_text
from localearn.engine.loop import FitResult, fit


@dataclass
class RepeatsResult:
    """Runs of one configuration that differ only in the seed."""

    seeds: list[int]
    results: list[FitResult]

    def stats(self, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation (0 for one run) of ``test_acc`` or
        ``best_test_acc`` over the seeds."""
        values = [getattr(r, key) for r in self.results]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fit_repeats(cfg: FitConfig) -> RepeatsResult:
    """Train ``cfg`` once per seed in ``cfg.seeds``, each into ``OUTPUT_DIR/seed-N``; write
    ``OUTPUT_DIR/seeds.json`` with every run's last and best accuracy and their mean and
    spread."""
    seeds = list(cfg.seeds or [cfg.seed])
    results = []
    for seed in seeds:
        one = cfg.model_copy(update={"seed": seed, "seeds": None,
                                     "output_dir": cfg.output_dir / f"seed-{seed}"})
        results.append(fit(one))
    out = RepeatsResult(seeds, results)
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
