"""``localearn plot``, ``localearn export`` and ``localearn predict``."""

from __future__ import annotations

import argparse
from pathlib import Path

#: what ``plot --metric`` accepts (`localearn.plot.METRICS`, kept here so ``--help`` stays light)
PLOT_METRICS = ("test_acc", "train_acc", "train_loss", "images_per_s")


def cmd_plot(args: argparse.Namespace) -> int:
    from localearn.plot import plot_runs

    out = plot_runs(args.runs, args.output, metric=args.metric, labels=args.label,
                    title=args.title, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def export_target(source: Path, output: Path | None) -> Path:
    """Where ``export`` writes: ``-o``, else beside the checkpoint with ``.safetensors`` (for
    a checkpoint in a run's ``checkpoints/`` folder, in the run folder, which is the run's
    own)."""
    if output is not None:
        return output
    path = source
    if source.is_dir():
        from localearn.engine.checkpoint import resolve

        final = source / "checkpoint.pt"
        path = final if final.is_file() else resolve("latest", source)[0]
    out = path.with_suffix(".safetensors")
    if out.parent.name == "checkpoints":
        out = out.parent.parent / out.name
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from localearn.export import export_safetensors
    from localearn.outputs import check_output

    target = export_target(args.checkpoint, args.output)
    check_output(target, overwrite=args.overwrite)
    out = export_safetensors(args.checkpoint, target, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from localearn.predict import run_predict

    return run_predict(args.run, args.images, top=args.top, device=args.device,
                       as_json=args.json)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``plot``, ``export`` and ``predict``."""
    from localearn.cli.common import DEVICE_HELP, JSON_HELP

    p = sub.add_parser("plot", help="draw the accuracy-epoch curves of runs to a PNG")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folders (each with a metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path,
                   help="PNG to write (default: METRIC.png in the first run's folder); an "
                        "existing PNG is replaced only with --overwrite, any other file (a "
                        "run's own files) never")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    p.add_argument("--metric", choices=list(PLOT_METRICS), default="test_acc")
    p.add_argument("--label", action="append", help="legend label, once per run in order")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("export", help="write a checkpoint's backbone weights to safetensors")
    p.add_argument("checkpoint", type=Path, help="a checkpoint file or a run folder")
    p.add_argument("-o", "--output", type=Path,
                   help="file to write (default: the checkpoint's name with .safetensors, in "
                        "the run folder); an existing file is replaced only with --overwrite, "
                        "a run's own files (a checkpoint...) never")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (never a checkpoint)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("predict", help="the top classes of image files under a trained run",
                       description="Classify image files with a run's trained backbone: each "
                                   "file resized to the run's input size and normalised as "
                                   "in training; prints the top classes with probabilities.")
    p.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top", type=int, default=3, metavar="N",
                   help="classes shown per image (default: 3)")
    p.add_argument("--device", default="cpu", help=f"{DEVICE_HELP} (default: cpu)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_predict)
