"""The ``analyze probe|cka|features`` and ``evaluate`` subcommands' flags; the commands
themselves are in `localearn.analysis.cli`, imported only when one runs (so ``--help`` does not
import torch)."""

from __future__ import annotations

import argparse
from importlib import import_module
from pathlib import Path
from typing import Any

from localearn.cli.common import DEVICE_HELP, add_json_flags


def _lazy(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        return getattr(import_module("localearn.analysis.cli"), name)(args)

    return run


def _common(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    if data_dir:
        p.add_argument("--data-dir", type=Path,
                       help="where the runs' training dataset is (default: as trained)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("-o", "--output", type=Path,
                   help="PNG to write (default: RUN/analysis/<analysis>.png of the first run)")
    add_json_flags(p, out_help="JSON file to write (default: beside the PNG)")
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
    p.set_defaults(func=_lazy("cmd_probe"))

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
    c.set_defaults(func=_lazy("cmd_cka"))

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
    f.set_defaults(func=_lazy("cmd_features"))

    e = subparsers.add_parser(
        "evaluate", help="test a run on another dataset's shared classes (e.g. STL-10)",
        description="Evaluate a checkpoint on another registered dataset's test split, on "
                    "the classes both share by name (STL-10 'car' = CIFAR-10 'automobile'); "
                    "images resized to the training resolution and normalised as in training.")
    e.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    e.add_argument("--dataset", help="registered target dataset, e.g. stl10 (default: the "
                                      "run's own, on its test split)")
    e.add_argument("--data-dir", type=Path, help="where the target dataset's files are "
                                                 "(default: the run's own dataset's folder)")
    e.add_argument("--train-data-dir", type=Path,
                   help="where the run's training dataset is (default: as trained)")
    e.add_argument("--restrict", action="store_true",
                   help="headline accuracy with the argmax over shared classes only "
                        "(default: over all training classes)")
    e.add_argument("--limit", type=int, help="use the first N target test images")
    e.add_argument("--download", action="store_true", help="let torchvision fetch the target")
    _common(e, data_dir=False)
    e.set_defaults(func=_lazy("cmd_evaluate"))
