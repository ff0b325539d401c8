"""The ``localearn`` command: ``fit``, ``rules``, ``models``, ``datasets``, ``plot``, ``export``,
``analyze``, ``evaluate``, ``predict``, ``memory``, ``bench``, ``frontier``, ``data``,
``table``.

User mistakes print one line, ``localearn: error: ...``, and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from localearn.errors import SameOnEveryRank, UserError
from localearn.peers import survivor_line

#: the environment variable that lets every command read pipe: URLs (`localearn.data.webdata`)
PIPE_ENV = "LOCALEARN_ALLOW_PIPE"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming what is wrong, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from localearn import __version__

    parser = OneLineParser(prog="localearn", description="Supervised local learning for PyTorch")
    parser.add_argument("--version", action="version", version=f"localearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    from localearn.cli.fit import add_fit_args, fit_command

    fit_p = sub.add_parser("fit", help="train a rule on a model and dataset")
    add_fit_args(fit_p)
    fit_p.set_defaults(func=fit_command)  # --resume, --nproc (torchrun), then fit
    from localearn.cli import listing

    listing.add_commands(sub)  # rules [NAME], models, datasets
    from localearn.cli.measure import add_commands as add_measure_commands

    add_measure_commands(sub)  # memory, bench, frontier
    from localearn.cli.run import add_commands as add_run_commands

    add_run_commands(sub)  # plot, export, predict
    from localearn.cli.analyze import add_commands as add_analysis_commands

    add_analysis_commands(sub)  # analyze probe|cka|features, evaluate
    from localearn.cli import data, table

    data.add_commands(sub)  # data cifar10-shards
    table.add_commands(sub)  # table DIR
    return parser


def _restore_pipes(saved: str | None) -> None:
    if saved is None:
        os.environ.pop(PIPE_ENV, None)
    else:
        os.environ[PIPE_ENV] = saved


def one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                     lineno: int, line: str | None = None) -> str:
    """A Python warning as the command line prints it: ``localearn: warning: ...``, one line
    (no file name, no source line)."""
    return f"localearn: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    # on the command line, shard lists may run shell commands (pipe: URLs) only when asked:
    # fit --allow-pipe, or LOCALEARN_ALLOW_PIPE=1 for every command
    saved_pipes = os.environ.get(PIPE_ENV)
    os.environ.setdefault(PIPE_ENV, "0")
    # warnings print in the errors' style (a recorder, such as pytest.warns, still gets them)
    saved_format = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # fit --nproc N starts N copies of this command
        return args.func(args)
    except UserError as exc:
        if not (isinstance(exc, SameOnEveryRank) and os.environ.get("RANK", "0") != "0"):
            print(f"localearn: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # another process of a torchrun job died: one line
        line = survivor_line(exc, os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?"))
        if line is None or "RANK" not in os.environ:
            raise
        print(f"localearn: error: {line}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM during fit (TrainingInterrupted)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not per process
            print(f"localearn: {getattr(exc, 'message', None) or 'interrupted'}",
                  file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    finally:
        _restore_pipes(saved_pipes)
        warnings.formatwarning = saved_format
