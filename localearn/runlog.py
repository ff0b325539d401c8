"""What a run writes for people to read: metrics files, TensorBoard, the run's settings.

``RUN_DIR/metrics.jsonl`` holds one JSON object per epoch::

    {"epoch": 3, "step": 63, "lr": 0.087, "train_loss": 0.41, "train_acc": 0.88,
     "local_losses": [0.9, 0.7], "test_acc": 0.93, "epoch_time": 12.5,
     "step_time": 0.19, "images_per_s": 330.0, "peak_mem_mb": 812.0}

plus ``batches`` and ``planned_batches`` (what the epoch delivered and what was planned) and,
for an epoch that delivered less than half its plan, a ``warning``.
``RUN_DIR/metrics.csv`` holds the same rows as a flat table (one row per epoch; a list such as
``local_losses`` spread over ``local_losses_0, local_losses_1, ...``), for a spreadsheet.
``RUN_DIR/log.txt`` keeps what the ``localearn`` logger printed during the run (rank 0), as the
console showed it. ``RUN_DIR/steps.jsonl`` holds one row every ``log_every`` steps (``step,
epoch, lr, loss, local_losses, train_acc`` of that batch, ``step_time, images_per_s,
peak_mem_mb``), ``RUN_DIR/config.json`` the validated settings, and ``RUN_DIR/tb/`` TensorBoard
events when asked. ``local_losses[i]`` is module i's auxiliary loss; ``train_loss`` is the last
module's (the network's own classifier). ``peak_mem_mb`` is the peak GPU memory allocated by
torch on CUDA and the peak resident memory of the process on CPU. Only rank 0 writes.

What a run says on the console goes through the ``localearn`` logger (`LOGGER`, rank 0 only):
`console_logging` sends it to stdout (warnings to stderr) unless the caller has set up logging
of their own, so a notebook or script can silence or redirect it with the `logging` module.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localearn.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: reading metrics needs none
    import torch
    from torch import nn

#: the logger every console message of a run goes through
LOGGER = logging.getLogger("localearn")


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``3 epochs``: a count and its noun, as the console says it."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def console_text(record: logging.LogRecord, text: str) -> str:
    """A record as the console shows it: warnings and errors as ``localearn: warning: ...``."""
    if record.levelno >= logging.WARNING:
        return f"localearn: {record.levelname.lower()}: {text}"
    return text


class FileLogHandler(logging.Handler):
    """The run's console lines, kept in ``RUN_DIR/log.txt`` (appended to on resume)."""

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__()
        self.path = path
        self.stream = open(path, mode, encoding="utf-8")  # noqa: SIM115  (closed in close)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(console_text(record, self.format(record)) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.stream.close()
        super().close()


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with flat columns: lists spread over ``key_0, key_1, ...``, dicts over
    ``key.sub``."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{key}_{i}": v for i, v in enumerate(value)})
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat_row(value).items()})
        else:
            out[key] = value
    return out


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """The rows of ``metrics.jsonl`` as CSV text: one row per epoch, the union of their
    columns in first-seen order, an empty cell where a row lacks one."""
    import csv
    import io

    flat = [flat_row(r) for r in rows]
    columns: dict[str, None] = {}
    for r in flat:
        columns.update(dict.fromkeys(r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


class ConsoleHandler(logging.Handler):
    """Records as plain lines: information on stdout, warnings and errors on stderr as
    ``localearn: warning: ...``. The streams are looked up per record, so a redirected
    ``sys.stdout`` (a notebook cell, a test's capture) receives them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(console_text(record, self.format(record)) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def console_logging(*, force: bool = False) -> None:
    """Show the ``localearn`` logger's messages on the console (level INFO) unless the caller
    set up logging already (a handler on ``localearn`` or on the root logger); ``force``: the
    command line, which owns its console. Silence with
    ``logging.getLogger("localearn").setLevel(logging.WARNING)``."""
    if any(isinstance(h, ConsoleHandler) for h in LOGGER.handlers):
        return
    if not force and (LOGGER.handlers or logging.getLogger().handlers):
        return
    LOGGER.addHandler(ConsoleHandler())
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # the console handler shows it; no second copy from the root


# ------------------------------------------------------------------ the run's summary facts
#: git settings that would run commands from a repository's own config: off for every call
_GIT_SAFE = ["-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null",
             "-c", "core.untrackedCache=false"]


def localearn_checkout() -> Path | None:
    """The git checkout localearn runs from (the folder above the package, holding ``.git``),
    None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / ".git").exists() else None


def _git(where: Path, *args: str) -> subprocess.CompletedProcess:
    """``git ARGS`` in ``where`` and nowhere above it, with no system or global config, no
    hooks, no file-system monitor and no prompt: a repository's config cannot run a command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0",
               GIT_OPTIONAL_LOCKS="0", GIT_CEILING_DIRECTORIES=str(where.absolute().parent))
    return subprocess.run(["git", *_GIT_SAFE, *args], cwd=where, capture_output=True,
                          text=True, timeout=10, env=env, stdin=subprocess.DEVNULL)


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """The git commit checked out in ``path`` (default: localearn's own checkout, never the
    working directory, whose repository may be anyone's) and whether tracked files differ
    from it; None outside a repository, for an installed localearn, or without git. Git runs
    with hooks, the file-system monitor and system and global config off."""
    where = localearn_checkout() if path is None else Path(path)
    if where is None or not (where / ".git").exists():
        return None
    try:
        head = _git(where, "rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = _git(where, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(),
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def versions() -> dict[str, str]:
    """The versions a result depends on: localearn, torch, Python (and CUDA when built with)."""
    import torch

    from localearn import __version__

    out = {"localearn": __version__, "torch": torch.__version__,
           "python": platform.python_version()}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of parameter values in ``module`` (each shared parameter once)."""
    return sum(p.numel() for p in module.parameters())


def parameters_by_role(net: nn.Module, groups: dict[str, nn.Module]) -> dict[str, int]:
    """Parameter counts of the backbone and of each role of the auxiliary networks (a rule's
    ``aux_groups``: ``heads``, and for MLAAN ``copies`` and ``twins``), plus the ``total`` of
    distinct parameters."""
    from torch import nn

    out = {"backbone": count_parameters(net)}
    for role, module in groups.items():
        out[role] = count_parameters(module)
    every = nn.ModuleList([net, *groups.values()])
    out["total"] = count_parameters(every)
    return out


def require_tensorboard() -> None:
    """`UserError` unless the ``tensorboard`` package (the ``tensorboard`` extra) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or, in a clone of localearn, pip install -e '.[tensorboard]'), or drop "
                        "--tensorboard") from None


def _write(path: Path, text: str, mode: str = "w") -> None:
    """Write (or append) text; a failed write is one `UserError` line naming the file."""
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or exc}") from None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory in bytes: on a CUDA device, torch's peak allocation; else the process's peak
    resident set size. On Linux that is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` would not
    do, because Linux carries it over fork and exec, so a worker started by a large parent
    reports the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on others)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_mb(device: torch.device) -> float:
    """`peak_memory_bytes` in MiB."""
    return peak_memory_bytes(device) / 2**20


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows (JSON objects) of a JSONL file; a torn last line (a killed writer) is dropped.
    A file that is not UTF-8 text is a `UserError`."""
    rows = []
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a JSONL text file (it holds bytes that are not "
                        "UTF-8)") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc.strerror or exc}") from None
    for line in text.splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


class RunLog:
    """Metrics files and optional TensorBoard for one run; a no-op when ``enabled`` is False
    (ranks other than 0)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        self.log_path = self.run_dir / "log.txt"
        self.steps_path = self.run_dir / "steps.jsonl"
        self.tb = None
        self._rows: list[dict[str, Any]] = []
        self._file_log: FileLogHandler | None = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                require_tensorboard()
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def start(self, config: dict[str, Any], history: list[dict], step: int) -> None:
        """Write the settings; rewrite the metrics files to what happened up to ``step`` (a
        resumed run drops rows logged after its checkpoint)."""
        if not self.enabled:
            return
        _write(self.run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        _write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        self._rows = list(history)
        _write(self.csv_path, metrics_csv(self._rows))
        if self._file_log is None:  # the console's lines from here on; a resume appends
            try:
                self._file_log = FileLogHandler(self.log_path, "a" if step > 0 else "w")
            except OSError as exc:
                raise UserError(f"could not write {self.log_path}: "
                                f"{exc.strerror or exc}") from None
            LOGGER.addHandler(self._file_log)
        kept = []
        if step > 0 and self.steps_path.is_file():
            kept = [r for r in read_jsonl(self.steps_path) if r.get("step", 0) <= step]
        _write(self.steps_path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.tb is not None and step > 0:
            self.tb.add_text("resume", f"resumed at step {step}", step)

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        _write(path, json.dumps(row) + "\n", "a")

    def _scalars(self, prefix: str, row: dict[str, Any], step: int) -> None:
        if self.tb is None:
            return
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.tb.add_scalar(f"{prefix}/{key}/{i}", v, step)
            elif isinstance(value, (int, float)):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def step(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.steps_path, row)
            self._scalars("step", row, row["step"])

    def epoch(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.metrics_path, row)
            self._rows.append(row)
            _write(self.csv_path, metrics_csv(self._rows))
            self._scalars("epoch", row, row["step"])
            if self.tb is not None:
                self.tb.flush()

    def close(self) -> None:
        if self._file_log is not None:
            LOGGER.removeHandler(self._file_log)
            self._file_log.close()
            self._file_log = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
