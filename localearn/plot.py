"""``localearn plot RUN_DIR...``: accuracy-epoch curves of one or more runs (the paper's
Figure 4), read from each run's ``metrics.jsonl``, drawn to a PNG with matplotlib."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from localearn.errors import UserError
from localearn.outputs import check_output, protect
from localearn.runlog import plural, read_jsonl

METRICS = {"test_acc": "test accuracy (%)", "train_acc": "train accuracy (%)",
           "train_loss": "train loss", "images_per_s": "images per second"}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_label(run_dir: Path) -> str:
    """``rule, model K=k`` from the run's config.json, K the one trained (summary.json's, the
    rule's default included), else the folder name."""
    cfg = _read(run_dir / "config.json")
    if not isinstance(cfg.get("rule"), str) or not isinstance(cfg.get("model"), str):
        return run_dir.name
    k = _read(run_dir / "summary.json").get("k") or cfg.get("k")
    return f"{cfg['rule']}, {cfg['model']}" + (f" K={k}" if k else "")


def default_output(runs: list[Path], metric: str) -> Path:
    """Where ``plot`` writes without ``-o``: ``<metric>.png`` in the first run's folder."""
    return Path(runs[0]) / f"{metric}.png"


def load_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``metric`` in a run folder's metrics.jsonl."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder: {path} does not exist")
    rows = [r for r in read_jsonl(path) if _number(r.get(metric)) and _number(r.get("epoch"))]
    if not rows:
        raise UserError(f"{path} has no epoch rows with a number for {metric!r}")
    scale = 100.0 if metric.endswith("_acc") else 1.0
    return [int(r["epoch"]) for r in rows], [float(r[metric]) * scale for r in rows]


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def plot_runs(runs: list[Path], out: Path | None = None, *, metric: str = "test_acc",
              labels: list[str] | None = None, title: str | None = None,
              overwrite: bool = False) -> Path:
    """Draw ``metric`` against epoch for every run into the PNG ``out`` (default: in the first
    run's folder, `default_output`; an existing PNG is replaced only with ``overwrite``; see
    `localearn.outputs.check_output`)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if labels and len(labels) != len(runs):
        raise UserError(f"{plural(len(labels), 'label')} for {plural(len(runs), 'run')}; give "
                        "one --label per run")
    out = default_output(runs, metric) if out is None else Path(out)
    check_output(out, overwrite=overwrite, png=True)
    curves = [load_curve(Path(r), metric) for r in runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (run, (x, y)) in enumerate(zip(runs, curves)):
        label = labels[i] if labels else run_label(Path(run))
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRICS[metric])
    ax.set_title(title or f"{METRICS[metric].split(' (')[0]} by epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, out)


def save_png(fig, out: Path) -> Path:
    """Write a matplotlib figure to ``out`` as a PNG, atomically (a failed write leaves no half
    PNG and is one `UserError` line), and close it. Never onto a run's own file (the caller
    has checked the target with `localearn.outputs.check_output` before its work)."""
    from localearn.engine.checkpoint import atomic_write_bytes

    protect(Path(out))

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
