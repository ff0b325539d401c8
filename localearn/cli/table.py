"""``localearn table DIR``: train every preset in a folder once per seed and print one markdown
table of the mean and spread of the last and best test accuracy.

Each run has its own folder, ``OUT/<preset>/seed-N`` (the layout of ``fit --seeds``, with a
``seeds.json`` per preset), so the command is resumable: a finished run is read back, not
trained again; an unfinished one (interrupted, with a checkpoint) is resumed; a run folder
made with other settings is refused rather than mixed into the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localearn.errors import UserError

PRESET_SUFFIXES = (".toml", ".yaml", ".yml")
#: flags passed to every preset (to shorten a table for a quick look, or point at the data)
OVERRIDES = {"dataset": str, "data_dir": Path, "epochs": int, "warmup_epochs": float,
             "train_limit": int, "test_limit": int, "batch_size": int, "device": str,
             "workers": int}
_HELP = {"dataset": "registered dataset for every preset, e.g. cifar10-shards (the shipped "
                    "shards) for cifar10",
         "data_dir": "where every preset's dataset is",
         "epochs": "epochs of every preset; its warm-up is scaled to match (10 of 400 epochs "
                   "-> 0.05 of 2) unless --warmup-epochs is given",
         "warmup_epochs": "warm-up epochs of every preset"}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table", help="run every preset in a folder over seeds; print a markdown table",
        description="Train every preset config (*.toml, *.yaml) under DIR once per seed, into "
                    "OUT/<preset>/seed-N, and print one markdown table of the mean and "
                    "sample standard deviation of the last and best test accuracy. Rerun the "
                    "same command after an interruption: finished runs are skipped, "
                    "unfinished ones resumed.")
    p.add_argument("presets", type=Path, metavar="DIR", help="folder of preset configs")
    p.add_argument("--seeds", default="0,1,2", metavar="A,B,...",
                   help="seeds of each preset's repeats (default: 0,1,2)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the runs go (default: runs/table-<DIR's name>)")
    for name, kind in OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       metavar={Path: "PATH", int: "N", float: "X"}.get(kind, "NAME"),
                       help=_HELP.get(name, f"{name.replace('_', ' ')} for every preset"))
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting for every preset (a fit flag's name, e.g. "
                        "--set lr=0.05 --set precision=bf16); repeatable")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.set_defaults(func=table_command)


@dataclass
class Row:
    """One preset's repeats: the settings and each seed's last and best test accuracy."""

    preset: str
    rule: str
    model: str
    dataset: str
    last: list[float]
    best: list[float]


def find_presets(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"preset folder {folder} does not exist")
    found = sorted(p for p in folder.rglob("*") if p.suffix in PRESET_SUFFIXES and p.is_file())
    if not found:
        raise UserError(f"no preset configs (*.toml, *.yaml) under {folder}")
    return found


def preset_names(folder: Path, presets: list[Path]) -> list[str]:
    """Each preset's name and run folder under OUT: its path under ``folder`` without the
    suffix (``a/dgl``), with it where two presets share that name (``a.toml``, ``a.yaml``),
    so no two presets share a run folder."""
    stems = [p.relative_to(folder).with_suffix("").as_posix() for p in presets]
    return [p.relative_to(folder).as_posix() if stems.count(stem) > 1 else stem
            for p, stem in zip(presets, stems)]


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["lr=0.05", "nesterov=false"]`` -> ``{"lr": 0.05, "nesterov": False}``: each key a
    `FitConfig` field, each value read as YAML (a number, true/false, a word, [a, b])."""
    import yaml

    from localearn.config import FitConfig

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=0.05")
        if key not in FitConfig.model_fields or key in ("seed", "seeds", "output_dir"):
            valid = ", ".join(k for k in FitConfig.model_fields
                              if k not in ("seed", "seeds", "output_dir"))
            raise UserError(f"--set {item!r}: unknown setting {key!r}; valid: {valid}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out[key] = value
    return out


def preset_settings(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides for one preset: a shorter run (``epochs``) keeps the preset's warm-up
    share of it unless the warm-up is given too."""
    from localearn.config import load_config

    out = dict(overrides)
    if "epochs" in out and "warmup_epochs" not in out:
        data = load_config(path)
        warm, epochs = data.get("warmup_epochs"), data.get("epochs")
        if isinstance(warm, (int, float)) and isinstance(epochs, int) and epochs > 0:
            out["warmup_epochs"] = round(warm * out["epochs"] / epochs, 6)
    return out


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas (got {text!r})") \
            from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name one or more different seeds (got {text!r})")
    return seeds


def run_one(cfg: Any) -> tuple[float, float, str]:
    """Train, resume or read back the run in ``cfg.output_dir``: its last and best test
    accuracy and what was done (``trained``, ``resumed`` or ``finished``)."""
    from localearn.engine import checkpoint, fit
    from localearn.engine.repeats import check_same_settings, finished_result

    out = cfg.output_dir
    held = checkpoint.held_run(out) if out.is_dir() else None
    if held is not None:
        check_same_settings(out, cfg)
    if held is not None and held[0] == "finished":
        done = finished_result(out)
        return done.test_acc, done.best_test_acc, "finished"
    action = "trained"
    if held is not None:  # unfinished: its newest checkpoint continues
        cfg = cfg.model_copy(update={"resume": "latest"})
        action = "resumed"
    result = fit(cfg)
    return result.test_acc, result.best_test_acc, action


def spread(values: list[float]) -> str:
    """``mean ± sample std`` in percent (std 0 for one run)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(rows: list[Row], seeds: list[int]) -> str:
    head = ("| preset | rule | model | dataset | seeds | last test acc (%) "
            "| best test acc (%) |\n|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.preset} | `{r.rule}` | {r.model} | {r.dataset} | "
        f"{','.join(str(s) for s in seeds)} | {spread(r.last)} | {spread(r.best)} |\n"
        for r in rows)
    return head + body


def run_table(folder: Path, seeds: list[int], out: Path,
              overrides: dict[str, Any] | None = None, progress: bool = True) -> list[Row]:
    """Every preset under ``folder`` over ``seeds``, into ``out``; one `Row` per preset (each
    preset's ``seeds.json`` written beside its seed folders)."""
    from localearn.config import make_config
    from localearn.engine.checkpoint import atomic_write_text
    from localearn.outputs import check_output

    presets = find_presets(folder)
    # the table's own file, rewritten when the command is rerun; never a run's files
    check_output(out / "table.md", flag="--out", overwrite=True)
    # every preset's settings checked before any training: a mistake is one line, at once
    plans = []
    for path, name in zip(presets, preset_names(folder, presets)):
        cfgs = []
        for seed in seeds:
            try:
                cfgs.append(make_config(path, **preset_settings(path, overrides or {}),
                                        seed=seed, seeds=None, progress=progress,
                                        output_dir=out / name / f"seed-{seed}"))
            except UserError as exc:
                raise UserError(f"preset {path}: {exc}") from None
        plans.append((name, cfgs))
    rows = []
    for name, cfgs in plans:
        last, best = [], []
        for seed, cfg in zip(seeds, cfgs):
            acc, best_acc, action = run_one(cfg)
            print(f"{name} seed {seed}: {action}, last {acc:.2%}, best {best_acc:.2%}",
                  flush=True)
            last.append(acc)
            best.append(best_acc)
        rows.append(Row(name, cfg.rule, cfg.model, cfg.dataset, last, best))
        summary = {"seeds": seeds, "test_acc": last, "best_test_acc": best}
        for key, values in (("test_acc", last), ("best_test_acc", best)):
            summary[f"{key}_mean"] = statistics.fmean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        atomic_write_text(out / name / "seeds.json", json.dumps(summary, indent=2))
    return rows


def table_command(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    out = args.out or Path("runs") / f"table-{args.presets.resolve().name}"
    overrides = {**parse_settings(args.settings),
                 **{k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}}
    rows = run_table(args.presets, seeds, out, overrides, progress=args.progress)
    text = markdown(rows, seeds)
    from localearn.engine.checkpoint import atomic_write_text

    atomic_write_text(out / "table.md", text)
    print()
    print(text, end="")
    print(f"\nwrote {out / 'table.md'} (mean ± sample standard deviation over the seeds)")
    return 0
