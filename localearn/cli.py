"""The ``localearn`` command: ``fit``, ``rules``, ``models``, ``datasets``, ``plot``, ``export``.

User mistakes print one line, ``localearn: error: ...``, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from localearn.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming what is wrong, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see: {self.prog} --help)")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML or YAML file with settings; flags override")
    p.add_argument("--rule", help="rule expression, e.g. dgl or 'mlaan(dgl, k=3)'")
    p.add_argument("--model", help="registered model (see: localearn models)")
    p.add_argument("--k", type=int, help="number of local modules K (the stem counts as a unit)")
    p.add_argument("--split", help="how units are grouped into modules (default: even)")
    p.add_argument("--dataset", help="registered dataset (default: digits, embedded)")
    p.add_argument("--data-dir", type=Path, help="where the dataset's files are")
    p.add_argument("--download", action="store_true", default=None,
                   help="let torchvision download the dataset into --data-dir")
    p.add_argument("--train-limit", type=int, help="train on the first N images only")
    p.add_argument("--test-limit", type=int, help="test on the first N images only")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loader worker processes")
    p.add_argument("--output-dir", type=Path, help="where metrics and checkpoints go")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="hide the progress bar")
    from localearn.run_cli import add_fit_args

    add_fit_args(p)  # precision, checkpoints, resume, logs, processes


def cmd_fit(args: argparse.Namespace) -> int:
    from localearn.run_cli import fit_command

    return fit_command(args)  # --resume, --nproc (torchrun), then fit


def _listing(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from localearn import registry

        rows = registry.listing(kind)
        width = max((len(n) for n, _ in rows), default=0)
        for name, text in rows:
            print(f"{name:<{width}}  {text}")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="localearn", description="Supervised local learning for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    fit_p = sub.add_parser("fit", help="train a rule on a model and dataset")
    _fit_args(fit_p)
    fit_p.set_defaults(func=cmd_fit)
    for kind in ("rule", "model", "dataset"):
        p = sub.add_parser(f"{kind}s", help=f"list the registered {kind}s")
        p.set_defaults(func=_listing(kind))
    from localearn.measure_cli import add_commands as add_measure_commands

    add_measure_commands(sub)  # memory, bench
    from localearn.run_cli import add_commands as add_run_commands

    add_run_commands(sub)  # plot, export
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # fit --nproc N starts N copies of this command
        return args.func(args)
    except UserError as exc:
        print(f"localearn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("localearn: interrupted", file=sys.stderr)
        return 130
