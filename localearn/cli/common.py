"""Pieces every ``localearn`` subcommand shares: the ``--device`` and ``--json`` flags, the
deprecated spellings they replace. Nothing here imports torch."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from localearn.runlog import plural  # noqa: F401  (re-exported for the commands)

#: what every training or analysis command accepts for --device
DEVICE_HELP = ("auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N (GPU number "
               "N) or mps (Apple GPUs, where PyTorch supports them)")
#: --json: the same meaning in every command
JSON_HELP = "print the results as JSON on stdout (instead of the table)"


def add_json_flags(p: argparse.ArgumentParser, *, out_help: str | None = None) -> None:
    """``--json`` (print JSON on stdout) and, with ``out_help``, ``--json-out FILE``. The old
    spelling ``--json FILE`` still writes FILE, with a one-line deprecation warning (`json_out`;
    a `FutureWarning`, which Python shows by default)."""
    p.add_argument("--json", nargs="?", const=True, default=False, metavar="",
                   help=JSON_HELP)
    if out_help is not None:
        p.add_argument("--json-out", type=Path, metavar="FILE", help=out_help)


def json_out(args: argparse.Namespace) -> Path | None:
    """The JSON file to write (``--json-out FILE``, or the deprecated ``--json FILE``), and
    ``args.json`` made a plain flag."""
    old = args.json
    if isinstance(old, str):
        warnings.warn(f"--json {old} is deprecated: --json now prints JSON on stdout; write a "
                      f"file with --json-out {old}", FutureWarning, stacklevel=2)
        args.json = False
        if getattr(args, "json_out", None) is None:
            args.json_out = Path(old)
    return getattr(args, "json_out", None)
