"""``localearn analyze probe|cka|features`` and ``localearn evaluate``.

Each command prints a markdown table on stdout, writes a JSON file (``--json``) and a PNG
(``-o``); both default to ``RUN/analysis/`` of the first run. Progress bars go to stderr and
only when stdout is a terminal. See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localearn.errors import UserError


# -------------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _progress(args: argparse.Namespace) -> bool:
    return bool(args.progress) and sys.stdout.isatty()


def _outputs(args: argparse.Namespace, folder: Path, stem: str) -> tuple[Path, Path]:
    """The PNG and JSON to write, checked before the work (`localearn.outputs`): never a
    run's own file, an existing file only with ``--overwrite``."""
    from localearn.outputs import check_outputs

    png = Path(args.output) if args.output else folder / "analysis" / f"{stem}.png"
    js = Path(args.json) if args.json else png.with_suffix(".json")
    check_outputs([("-o", png, True), ("--json", js, False)], overwrite=args.overwrite)
    return png, js


def _write_json(path: Path, data: Any) -> None:
    from localearn.engine.checkpoint import atomic_write_text
    from localearn.outputs import protect

    protect(path, "--json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _done(png: Path, js: Path) -> None:
    print(f"wrote {png} and {js}", file=sys.stderr, flush=True)


def _indices(values: list[str] | None) -> list[int] | None:
    """``--modules 0 3 -1`` or ``--modules 0,3,-1`` -> [0, 3, -1]."""
    if values is None:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                try:
                    out.append(int(part))
                except ValueError:
                    raise UserError(f"not an index: {part!r} (expected integers such as "
                                    "0,3,-1)") from None
    return out


def _load(paths: Sequence[str], args: argparse.Namespace) -> list:
    from localearn.analysis.runs import load_run

    return [load_run(p, args.device, data_dir=args.data_dir) for p in paths]


# ------------------------------------------------------------------------------- probe
def cmd_probe(args: argparse.Namespace) -> int:
    from localearn.analysis.features import module_ends
    from localearn.analysis.probe import plot_probes, probe_run

    runs = _load(args.runs, args)
    png, js = _outputs(args, runs[0].folder, "probe")
    same_model = len({r.model for r in runs}) == 1
    union = sorted({u for r in runs for u in module_ends(r.net)})
    reports = []
    for run in runs:
        if args.units:
            units = list(range(len(run.net.units)))
        else:  # one model: every run at every run's boundaries, so the rows line up
            units = union if same_model else module_ends(run.net)
        reports.append(probe_run(run, units, train_limit=args.train_limit,
                                 test_limit=args.test_limit, batch_size=args.batch_size,
                                 max_iter=args.max_iter, l2=args.l2, seed=args.seed,
                                 progress=_progress(args)))
    all_units = sorted({s.unit for rep in reports for s in rep.scores})
    rows = []
    for u in all_units:
        cells, width = [], None
        for run, rep in zip(runs, reports):
            score = next((s for s in rep.scores if s.unit == u), None)
            if score is None:
                cells.append("–")
                continue
            width = score.dim
            mark = " *" if u in module_ends(run.net) else ""  # the run's own boundary
            cells.append(f"{_pct(score.test_acc)}{mark}")
        rows.append([u, width, *cells])
    headers = ["unit", "dim", *[f"{rep.run} test %" for rep in reports]]
    print(markdown_table(headers, rows))
    print("\n`*` marks the run's own module boundaries; test accuracy of a linear probe on "
          "pooled features")
    plot_probes(reports, png)
    _write_json(js, {"analysis": "linear_probe", "l2": args.l2, "max_iter": args.max_iter,
                     "runs": [rep.to_dict() for rep in reports]})
    _done(png, js)
    return 0


# --------------------------------------------------------------------------------- cka
def cmd_cka(args: argparse.Namespace) -> int:
    from localearn.analysis.cka import cka, plot_cka

    paths = list(args.runs)
    if args.against is None:
        if len(paths) < 2:
            raise UserError("cka needs two runs: RUN_A RUN_B, or RUN... --against RUN")
        reference_path, compared = paths[-1], paths[:-1]  # the last run is the reference
    else:
        reference_path, compared = args.against, paths
    reference = _load([reference_path], args)[0]
    runs = _load(compared, args)
    for run in runs:
        if run.model != reference.model:
            raise UserError(f"cka compares runs of one model: {run.label} is {run.model}, "
                            f"the reference {reference.label} is {reference.model}")
    png, js = _outputs(args, runs[0].folder, "cka")
    results = [cka(run, reference, pool=args.pool, limit=args.limit,
                   batch_size=args.batch_size, progress=_progress(args)) for run in runs]
    rows = []
    for r in results:
        for u, (ma, mb), v in zip(r.boundaries, r.modules, r.at_boundaries):
            rows.append([r.run, u, f"{ma} / {mb}", f"{v:.4f}"])
        rows.append([r.run, "mean", "", f"**{r.mean:.4f}**"])
    print(markdown_table(["run", "unit", "module (run / reference)",
                          f"CKA vs {reference.label}"], rows))
    what = "pooled" if args.pool else "flattened"
    print(f"\nlinear CKA (minibatch unbiased HSIC) on {results[0].images} test images, "
          f"{what} unit outputs")
    plot_cka(results, png)
    _write_json(js, {"analysis": "cka", "estimator": "minibatch unbiased HSIC",
                     "batch_size": args.batch_size, "against": reference.label,
                     "results": [r.to_dict() for r in results]})
    _done(png, js)
    return 0


# ---------------------------------------------------------------------------- features
def cmd_features(args: argparse.Namespace) -> int:
    from localearn.analysis.features import feature_maps, module_ends, pick

    if args.modules is not None and args.units is not None:
        raise UserError("pass --modules or --units, not both")
    runs = _load(args.runs, args)
    modules, units = _indices(args.modules), _indices(args.units)
    first = runs[0].net  # indices checked before the outputs: the input's mistake first
    if units is not None:
        pick(range(len(first.units)), len(first.units), units, "unit")
    elif modules is not None:
        pick(module_ends(first), len(module_ends(first)), modules, "module")
    png, js = _outputs(args, runs[0].folder, "features")
    stats = feature_maps(runs, png, images=args.images, channels=args.channels,
                         modules=modules, units=units)
    rows = []
    for r in stats["runs"]:
        for p in r["positions"]:
            shape = "x".join(str(s) for s in p["shape"])
            rows.append([r["run"], p["module"], p["unit"], shape, f"{p['mean']:.3f}",
                         f"{100 * p['zeros']:.1f}", f"{100 * p['top10_share']:.1f}"])
    print(markdown_table(["run", "module", "unit", "shape", "mean", "zeros %",
                          "top-10% share %"], rows))
    print(f"\nover the first {stats['images']} test images; top-10% share: part of the "
          "channel-mean activation in the hottest 10% of positions (10 = evenly spread)")
    _write_json(js, {"analysis": "feature_maps", **stats})
    _done(png, js)
    return 0


# ---------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from localearn.analysis.runs import load_run
    from localearn.analysis.transfer import evaluate_transfer, plot_transfer

    run = load_run(args.run, args.device, data_dir=args.train_data_dir)
    png, js = _outputs(args, run.folder, f"transfer-{args.dataset}")
    res = evaluate_transfer(run, args.dataset, args.data_dir, restrict=args.restrict,
                            batch_size=args.batch_size, limit=args.limit,
                            download=args.download, progress=_progress(args))
    rows = [[name, int(v["images"]), _pct(v["accuracy_all_classes"]),
             _pct(v["accuracy_restricted"])] for name, v in res.per_class.items()]
    rows.append(["**all shared classes**", res.images, _pct(res.accuracy_all_classes),
                 _pct(res.accuracy_restricted)])
    print(markdown_table(["class", "images", "argmax all %", "argmax shared %"], rows))
    pick = "shared classes only" if res.restrict else "all training classes"
    print(f"\n{run.label} on {args.dataset}: accuracy {_pct(res.accuracy)}% (argmax over "
          f"{pick}); left out: {', '.join(res.source_left_out) or 'none'} (training), "
          f"{', '.join(res.target_left_out) or 'none'} ({args.dataset})")
    plot_transfer(res, png)
    _write_json(js, {"analysis": "transfer", **res.to_dict()})
    _done(png, js)
    return 0


# ------------------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    if data_dir:
        p.add_argument("--data-dir", type=Path,
                       help="where the runs' training dataset is (default: as trained)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("-o", "--output", type=Path,
                   help="PNG to write (default: RUN/analysis/<analysis>.png of the first run)")
    p.add_argument("--json", type=Path, help="JSON to write (default: beside the PNG)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never a run's own files)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bars")


def add_commands(subparsers: Any) -> None:
    """Add ``analyze`` (probe, cka, features) and ``evaluate`` to ``localearn``'s
    subparsers."""
    an = subparsers.add_parser(
        "analyze", help="probe, cka, features: what the trained modules learned",
        description="Analyses of trained runs (docs/analysis.md): layer-wise linear probes, "
                    "CKA similarity to a reference run, channel feature maps.")
    sub = an.add_subparsers(dest="analysis", required=True)

    p = sub.add_parser("probe", help="linear probe accuracy at every module boundary",
                       description="Train a linear classifier on the frozen, pooled features "
                                   "at each module boundary (or unit) and report its test "
                                   "accuracy (the paper's Fig. 6).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or checkpoint files")
    p.add_argument("--units", action="store_true", help="probe after every unit")
    p.add_argument("--train-limit", type=int, help="train probes on N random train images")
    p.add_argument("--test-limit", type=int, help="test probes on N random test images")
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations (default 200)")
    p.add_argument("--l2", type=float, default=1e-4, help="weight penalty (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subsets")
    _common(p)
    p.set_defaults(func=cmd_probe)

    c = sub.add_parser("cka", help="linear CKA of runs against a reference run",
                       description="Linear CKA (minibatch unbiased estimator) between every "
                                   "unit of each run and of the reference run, on the test "
                                   "split; reports the values at the run's module boundaries "
                                   "and their mean (the paper's Fig. 7).")
    c.add_argument("runs", nargs="+", metavar="RUN",
                   help="RUN_A RUN_B: A against B (without --against, the last run is the "
                        "reference and every other run is compared with it)")
    c.add_argument("--against", metavar="RUN",
                   help="the reference run (e.g. BP); every RUN is compared with it")
    c.add_argument("--pool", action="store_true",
                   help="compare globally pooled features instead of whole maps")
    c.add_argument("--limit", type=int, help="use the first N test images")
    _common(c)
    c.set_defaults(func=cmd_cka)

    f = sub.add_parser("features", help="channel feature maps of a few test images",
                       description="Draw the first channels of chosen module outputs for a "
                                   "few test images, runs side by side (the paper's Fig. 5).")
    f.add_argument("runs", nargs="+", metavar="RUN", help="run folders or checkpoint files")
    f.add_argument("--images", type=int, default=4, help="test images (default 4)")
    f.add_argument("--channels", type=int, default=8, help="channels per output (default 8)")
    f.add_argument("--modules", nargs="+", metavar="I",
                   help="module indices of the first run (negative from the end; default: "
                        "up to four, first and last among them)")
    f.add_argument("--units", nargs="+", metavar="U", help="unit indices instead of modules")
    _common(f)
    f.set_defaults(func=cmd_features)

    e = subparsers.add_parser(
        "evaluate", help="test a run on another dataset's shared classes (e.g. STL-10)",
        description="Evaluate a checkpoint on another registered dataset's test split, on "
                    "the classes both share by name (STL-10 'car' = CIFAR-10 'automobile'); "
                    "images resized to the training resolution and normalised as in training.")
    e.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    e.add_argument("--dataset", required=True, help="registered target dataset, e.g. stl10")
    e.add_argument("--data-dir", type=Path, help="where the target dataset's files are")
    e.add_argument("--train-data-dir", type=Path,
                   help="where the run's training dataset is (default: as trained)")
    e.add_argument("--restrict", action="store_true",
                   help="headline accuracy with the argmax over shared classes only "
                        "(default: over all training classes)")
    e.add_argument("--limit", type=int, help="use the first N target test images")
    e.add_argument("--download", action="store_true", help="let torchvision fetch the target")
    _common(e, data_dir=False)
    e.set_defaults(func=cmd_evaluate)
