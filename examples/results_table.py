"""A markdown table of finished runs: every ``seed-N/summary.json`` under the folders given
(as ``localearn fit --seeds`` writes them), one row per rule with the mean and sample standard
deviation of the last test error over its seeds.

    python examples/results_table.py runs/compare
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def spread(values: list[float]) -> str:
    return f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else ""


def rows(root: Path) -> list[tuple[str, list[dict]]]:
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted(folder.glob("seed-*/summary.json"))]
        if runs:
            out.append((runs[0]["rule"], runs))
    return out


def main() -> None:
    for root in map(Path, sys.argv[1:] or ["runs/compare"]):
        print("| rule | K | seeds | test error (last) | test error (best) | train time |")
        print("|---|---|---|---|---|---|")
        for rule, runs in rows(root):
            last = [100 * (1 - r["last_test_acc"]) for r in runs]
            best = [100 * (1 - r["best_test_acc"]) for r in runs]
            seeds = ",".join(str(r["seed"]) for r in runs)
            time = statistics.fmean(r["train_time_s"] for r in runs)
            print(f"| `{rule}` | {runs[0]['k']} | {seeds} | {statistics.fmean(last):.2f}%"
                  f"{spread(last)} | {statistics.fmean(best):.2f}%{spread(best)} | "
                  f"{time:.0f} s |")


if __name__ == "__main__":
    main()
