"""Run folders: where a run's files go, how a run claims its folder (and holds it for the whole
run, `RunLock`), which checkpoint ``--resume`` names, and whether a folder holds a finished or an
unfinished run.

A run folder belongs to one run: without a named folder each run gets a new one
(`new_run_dir`: ``runs/<date>-<rule>-<model>-k<K>``); `claim_run_dir` refuses to start a run in
a named folder that holds another (finished or unfinished) unless asked to replace it, and
resuming continues in the folder the checkpoint is in (`run_dir_of`) unless another is named.
Step checkpoints go to ``RUN_DIR/checkpoints/step-NNNNNNNNN.pt``; a finished run keeps
``RUN_DIR/checkpoint.pt``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

import torch

from localearn.engine.atomic import os_problem, short_path
from localearn.errors import UserError

_NAME = re.compile(r"^step-(\d+)\.pt$")


# ----------------------------------------------------------------------------- files
def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (by step)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep: int, spare: Path | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints (and stale temporary files); ``spare``
    (the checkpoint a run continues from) is never deleted."""
    files = list_checkpoints(run_dir)
    for old in files[:-keep] if keep > 0 else files:
        if spare is None or old.resolve() != spare.resolve():
            old.unlink(missing_ok=True)
    for tmp in checkpoint_dir(run_dir).glob(".step-*.pt.tmp"):
        tmp.unlink(missing_ok=True)



def _run_files(run_dir: Path) -> list[Path]:
    """A run's step checkpoints, or its final ``checkpoint.pt`` once it has finished."""
    files = list_checkpoints(run_dir)
    final = run_dir / "checkpoint.pt"
    return files if files or not final.is_file() else [final]


def resolve(resume: str, run_dir: Path | None) -> tuple[Path, Path | None]:
    """The checkpoint ``--resume`` names (a file, a run folder, or ``latest`` for the newest in
    ``run_dir``, or with no ``run_dir`` in the newest run under `RUNS_ROOT`) and the one before
    it in its folder (None if none)."""
    if resume == "latest":
        if run_dir is None:
            run_dir = latest_run()
        files = _run_files(Path(run_dir))
        if not files:
            raise UserError(f"nothing to resume: no checkpoints in {checkpoint_dir(run_dir)}; "
                            "run without --resume to start, or pass --resume PATH")
    else:
        target = Path(resume)
        if target.is_dir():
            files = _run_files(target) or list_checkpoints(target.parent)
            if not files:
                raise UserError(f"nothing to resume: no checkpoints in {target}")
        elif target.is_file():
            siblings = list_checkpoints(target.parent.parent)
            before = [p for p in siblings if p.name < target.name]
            return target, (before[-1] if before else None)
        else:
            raise UserError(f"checkpoint {target} does not exist")
    return files[-1], (files[-2] if len(files) > 1 else None)


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to: ``RUN`` for ``RUN/checkpoints/step-N.pt``
    and for ``RUN/checkpoint.pt`` (wherever that folder has been moved or copied)."""
    p = Path(checkpoint)
    if p.parent.name == "checkpoints" and _NAME.match(p.name):
        return p.parent.parent
    return p.parent



def unfinished(run_dir: Path) -> str | None:
    """A description of an unfinished run whose checkpoints are in ``run_dir``, else None."""
    files = list_checkpoints(run_dir)
    if not files:
        return None
    try:
        ckpt = torch.load(files[-1], map_location="cpu", weights_only=True, mmap=True)
        epochs = ckpt["config"]["epochs"]
        if ckpt["epoch_done"] and ckpt["epoch"] >= epochs:
            return None
        return f"step {ckpt['step']}, epoch {ckpt['epoch']} of {epochs}"
    except Exception:
        return f"its newest checkpoint {files[-1].name} is unreadable"


# ----------------------------------------------------------------------- run folders
#: what a run writes in its folder (and what --overwrite removes)
RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl", "metrics.csv", "steps.jsonl",
             "config.json", "log.txt", "best.pt")
#: where runs go when no output folder is named (relative to the working directory)
RUNS_ROOT = Path("runs")


def run_name(rule: str, model: str, k: int, when: datetime | None = None) -> str:
    """A run folder's name, ``<date>-<time>-<rule>-<model>-k<K>``, safe for any file system
    (``mlaan(dgl, k=3)`` becomes ``mlaan-dgl-k3``)."""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")

    def slug(text: str, n: int) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", text.replace("=", "")).strip("-.")[:n] or "x"

    return f"{stamp}-{slug(rule, 60)}-{slug(model, 40)}-k{k}"


def new_run_dir(name: str, root: Path | None = None) -> Path:
    """Make a new, empty folder ``root/name`` (``name-2``, ``name-3``... when taken) and
    return it; never an existing one, even with another run starting at the same moment."""
    root = RUNS_ROOT if root is None else Path(root)
    usable_dir(root)
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"run folder {short_path(path)} cannot be made: "
                            f"{os_problem(path, exc)}; name one with --out") from None
    raise UserError(f"no free run folder name {name}-N in {root}; name one with --out")


def latest_run(root: Path | None = None) -> Path:
    """The run folder under ``root`` (default `RUNS_ROOT`) whose newest checkpoint is the most
    recent; a one-line `UserError` when there is none."""
    root = RUNS_ROOT if root is None else Path(root)
    newest: tuple[float, Path] | None = None
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            for f in _run_files(folder) if folder.is_dir() else []:
                if newest is None or f.stat().st_mtime > newest[0]:
                    newest = (f.stat().st_mtime, folder)
        except OSError:
            continue
    if newest is None:
        raise UserError(f"nothing to resume: no run with a checkpoint in {root}/; pass --resume "
                        "RUN_DIR (or a checkpoint file), or --out RUN_DIR with --resume")
    return newest[1]


def drop_empty_checkpoint_dir(run_dir: Path) -> None:
    """Remove ``run_dir/checkpoints`` if nothing is left in it (a finished run)."""
    try:
        checkpoint_dir(run_dir).rmdir()
    except OSError:
        pass  # absent, or still holding files



def usable_dir(out: Path) -> None:
    """Make the output folder ``out`` (and its parents) and check a file can be written
    there; else a one-line `UserError` saying why not (a file, under a file, read-only, a
    name too long, a full disk)."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"output folder {short_path(out)} is a file; pick a folder with "
                            "--output-dir")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".localearn-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output folder {short_path(out)} cannot be used: "
                        f"{os_problem(out, exc)}; pick another --output-dir") from None


def held_run(run_dir: Path) -> tuple[str, str] | None:
    """``("unfinished"|"finished", what)`` for a run whose files are in ``run_dir``, else
    None (no checkpoint and no summary: nothing worth keeping)."""
    run_dir = Path(run_dir)
    state = unfinished(run_dir)
    if state:
        return "unfinished", state
    final, summary = run_dir / "checkpoint.pt", run_dir / "summary.json"
    if not (list_checkpoints(run_dir) or final.is_file() or summary.is_file()):
        return None
    what = "its checkpoint.pt"
    try:
        s = json.loads(summary.read_text())
        n = s["epochs"]
        what = (f"{s['rule']} on {s['model']}, {n} epoch{'' if n == 1 else 's'}, test "
                f"accuracy {s['last_test_acc']:.2%}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "finished", what


def clear_run(run_dir: Path) -> None:
    """Remove a run's own files from ``run_dir`` (checkpoints first; other files stay)."""
    run_dir = Path(run_dir)
    prune(run_dir, 0)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def claim_run_dir(out: Path, *, resume_from: Path | None = None,
                  overwrite: bool = False) -> None:
    """Make ``out`` the folder of the run about to start (``resume_from``: the checkpoint it
    continues), or refuse in one line: a new run may not replace another run's files, and a
    resumed one may continue in its own folder or in one holding no other run, unless
    ``overwrite`` (then the other run's files are removed first, checkpoints first)."""
    out = Path(out)
    usable_dir(out)
    if resume_from is not None and \
            run_dir_of(resume_from).resolve() == out.resolve():
        return  # continuing in its own folder
    held = held_run(out)
    if held is not None and not overwrite:
        kind, what = held
        if resume_from is not None:
            raise UserError(f"{out} holds another, {kind} run ({what}); resuming "
                            f"{resume_from} there would overwrite it: leave out --output-dir "
                            f"to continue in {run_dir_of(resume_from)}, pick an empty "
                            "--output-dir, or pass --overwrite to replace that run")
        if kind == "unfinished":
            raise UserError(f"{out} holds the checkpoints of an unfinished run ({what}); "
                            f"continue it with: localearn fit --resume {out}; or leave out "
                            "--out to start a new run in a new folder (or pass --overwrite to "
                            "replace it)")
        raise UserError(f"{out} holds a finished run ({what}); leave out --out to start a "
                        "new run in a new folder, pick another --out, or pass --overwrite to "
                        "replace it")
    clear_run(out)



# ---------------------------------------------------------------------------- lock
#: the file a running run holds locked in its folder
LOCK_NAME = ".localearn.lock"


class RunLock:
    """A run folder held by one run for the whole run: an exclusive lock (``flock``) on
    ``RUN/.localearn.lock``, which names its holder. The operating system drops the lock when
    the holder ends, however it ends, so a lock left by a killed run is taken over (and said)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, or a one-line `UserError` naming the run holding it; a note when a
        stale lock of a process that is gone was taken over."""
        import fcntl
        import socket

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"run folder {short_path(self.path.parent)} cannot be locked: "
                            f"{os_problem(self.path.parent, exc)}") from None
        holder = os.read(fd, 512).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by a run still training "
                            f"({holder or 'holder unknown'}); wait for it to finish or stop "
                            "it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        when = datetime.now().isoformat(timespec="seconds")
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {when}\n".encode())
        self._fd = fd
        if holder:
            return (f"took over the lock of {self.path.parent} from {holder}, which is no "
                    "longer running")
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None
