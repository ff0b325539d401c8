"""``localearn analyze probe|cka|features`` and ``localearn evaluate``.

Each command prints a markdown table on stdout (``--json``: the results as JSON instead),
writes a JSON file (``--json-out``) and a PNG (``-o``); both default to ``RUN/analysis/`` of
the first run. Progress bars go to stderr and only when stdout is a terminal. See
docs/analysis.md.
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
    from localearn.cli.common import json_out
    from localearn.outputs import check_outputs

    png = Path(args.output) if args.output else folder / "analysis" / f"{stem}.png"
    js = json_out(args) or png.with_suffix(".json")
    check_outputs([("-o", png, True), ("--json-out", js, False)], overwrite=args.overwrite)
    return png, js


def _report(args: argparse.Namespace, table: str, note: str, data: dict[str, Any]) -> None:
    """The table and its note on stdout, or with ``--json`` the results as JSON."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(table)
        print(f"\n{note}")


def _write_json(path: Path, data: Any) -> None:
    from localearn.engine.checkpoint import atomic_write_text
    from localearn.outputs import protect

    protect(path, "--json-out")
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
    data = {"analysis": "linear_probe", "l2": args.l2, "max_iter": args.max_iter,
            "runs": [rep.to_dict() for rep in reports]}
    _report(args, markdown_table(headers, rows), "`*` marks the run's own module boundaries; "
            "test accuracy of a linear probe on pooled features", data)
    plot_probes(reports, png)
    _write_json(js, data)
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
    what = "pooled" if args.pool else "flattened"
    data = {"analysis": "cka", "estimator": "minibatch unbiased HSIC",
            "batch_size": args.batch_size, "against": reference.label,
            "results": [r.to_dict() for r in results]}
    _report(args, markdown_table(["run", "unit", "module (run / reference)",
                                  f"CKA vs {reference.label}"], rows),
            f"linear CKA (minibatch unbiased HSIC) on {results[0].images} test images, "
            f"{what} unit outputs", data)
    plot_cka(results, png)
    _write_json(js, data)
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
    data = {"analysis": "feature_maps", **stats}
    _report(args, markdown_table(["run", "module", "unit", "shape", "mean", "zeros %",
                                  "top-10% share %"], rows),
            f"over the first {stats['images']} test images; top-10% share: part of the "
            "channel-mean activation in the hottest 10% of positions (10 = evenly spread)", data)
    _write_json(js, data)
    _done(png, js)
    return 0


# ---------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from localearn.analysis.runs import load_run
    from localearn.analysis.transfer import evaluate_transfer, plot_transfer

    run = load_run(args.run, args.device, data_dir=args.train_data_dir)
    own = args.dataset is None or args.dataset == run.dataset
    if args.dataset is None:  # the run's own dataset, from where it was trained
        args.dataset = run.dataset
    data_dir = args.data_dir if args.data_dir is not None or not own else run.data_dir
    png, js = _outputs(args, run.folder, f"transfer-{args.dataset}")
    res = evaluate_transfer(run, args.dataset, data_dir, restrict=args.restrict,
                            batch_size=args.batch_size, limit=args.limit,
                            download=args.download, progress=_progress(args))
    rows = [[name, int(v["images"]), _pct(v["accuracy_all_classes"]),
             _pct(v["accuracy_restricted"])] for name, v in res.per_class.items()]
    rows.append(["**all shared classes**", res.images, _pct(res.accuracy_all_classes),
                 _pct(res.accuracy_restricted)])
    pick = "shared classes only" if res.restrict else "all training classes"
    data = {"analysis": "transfer", **res.to_dict()}
    _report(args, markdown_table(["class", "images", "argmax all %", "argmax shared %"], rows),
            f"{run.label} on {args.dataset}: accuracy {_pct(res.accuracy)}% (argmax over "
            f"{pick}); left out: {', '.join(res.source_left_out) or 'none'} (training), "
            f"{', '.join(res.target_left_out) or 'none'} ({args.dataset})", data)
    plot_transfer(res, png)
    _write_json(js, data)
    _done(png, js)
    return 0
