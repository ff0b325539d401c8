"""Checkpoints: atomic writes, integrity checks, exact resume, safetensors export.

A checkpoint is a `torch.save` file (a zip archive with a CRC-32 per record) holding a plain
dict: the model, the auxiliary networks (heads, EMA twins...), any rule state, optimizer,
gradient scaler, schedule position, every rank's RNG states, the data position (epoch and
batches done in it), the epoch's running train statistics and the history so far. It loads
with ``torch.load(path, weights_only=True)``.

Files go to ``RUN_DIR/checkpoints/step-NNNNNNNNN.pt`` every ``checkpoint_every`` steps and at
each epoch end; the last ``keep_checkpoints`` are kept. Each is written to a temporary file,
fsynced and renamed, so a kill at any moment leaves either the old set or the new file whole.
Before loading, the archive's CRCs are checked and the contents are validated against the run;
a damaged or mismatched file, or one holding NaN or infinite weights or optimizer state, is
refused with a `UserError`, never half-loaded. A write that fails (a full disk, say) removes
its temporary file and leaves the previous checkpoint as it was.

A run folder belongs to one run: without a named folder each run gets a new one
(`new_run_dir`: ``runs/<date>-<rule>-<model>-k<K>``); `claim_run_dir` refuses to start a run in
a named folder that holds another (finished or unfinished) unless asked to replace it, and
resuming continues in the folder the checkpoint is in (`run_dir_of`) unless another is named.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from localearn.errors import UserError

FORMAT = "localearn-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "config", "step", "epoch", "batch_in_epoch", "epoch_done",
            "model", "aux", "optimizer")
_NAME = re.compile(r"^step-(\d+)\.pt$")

#: settings that define what is trained: a checkpoint with other values cannot be loaded
STRUCTURE = ("rule", "model", "k", "split", "dataset")
#: settings that fix which samples make up each step: may change only at an epoch boundary
DATA_LAYOUT = ("batch_size", "train_limit", "seed")
#: settings that change the trajectory: allowed, with a notice that the run is no longer exact
TRAJECTORY = ("epochs", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs",
              "warmup_lr", "precision")


class WriteFailed(UserError):
    """A file could not be written (its temporary file was removed; the old file is intact)."""

    def __init__(self, message: str, path: Path, no_space: bool) -> None:
        super().__init__(message)
        self.path, self.no_space = path, no_space


def _os_error(exc: BaseException) -> OSError | None:
    """The `OSError` behind ``exc`` (itself, or one it was raised from or during)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _no_space(path: Path, os_err: OSError | None) -> bool:
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:  # torch reports a failed write without its errno: look at the disk
        return os_err is None and shutil.disk_usage(mount_point(path)).free < 2**20
    except OSError:
        return False


def write_failed(path: Path, exc: BaseException) -> WriteFailed:
    """A one-line `WriteFailed` for a failed write of ``path``."""
    os_err = _os_error(exc)
    if _no_space(path, os_err):
        return WriteFailed(f"no space left on the device {mount_point(path)} while writing "
                           f"{path}", path, True)
    if os_err is not None:
        why = _os_problem(Path(path).parent, os_err)
    else:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WriteFailed(f"could not write {path}: {why}", path, False)


def _atomic(path: Path, write: Any) -> None:
    """``write(f)`` to a temporary file beside ``path``, fsync, rename over ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            raise write_failed(path, exc) from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file, fsync it, then rename over ``path``;
    a failed write (a full disk...) is a `WriteFailed` and leaves no temporary file."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    _atomic(path, lambda f: f.write(data))


# ------------------------------------------------------------------------- finiteness
def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list (a state dict, an optimizer's), by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


#: a weight, buffer or optimizer value beyond this (the square root of the largest float32)
#: is as bad as an infinity: squared (a BatchNorm variance, a norm) it overflows, and a run
#: resumed from it diverges again; no healthy run comes near it
OVERFLOW = 2.0**64


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN, an infinity or a value
    beyond `OVERFLOW` in magnitude, else None (one host read per device)."""
    by_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name, t in named:
        if t.is_floating_point() or t.is_complex():
            names, flags = by_device.setdefault(t.device, ([], []))
            names.append(name)
            flags.append((t.abs() <= OVERFLOW).all())  # False for NaN and infinity too
    for names, flags in by_device.values():
        ok = torch.stack(flags).tolist()
        if not all(ok):
            return names[ok.index(False)]
    return None


def nonfinite_in(ckpt: dict[str, Any]) -> str | None:
    """The first non-finite (or overflowing) tensor among a checkpoint's weights, buffers
    and optimizer state."""
    parts = {"model": ckpt.get("model"), "aux": ckpt.get("aux"), "rule": ckpt.get("rule"),
             "optimizer": (ckpt.get("optimizer") or {}).get("state")}
    return first_nonfinite(named_tensors({k: v for k, v in parts.items() if v is not None}))


# ----------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """The process's RNG states (torch CPU and current CUDA device, numpy, random), stored
    as tensors and plain lists so ``weights_only`` loading accepts them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "random": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and stale temporary files)."""
    files = list_checkpoints(run_dir)
    for old in files[:-keep] if keep > 0 else files:
        old.unlink(missing_ok=True)
    for tmp in checkpoint_dir(run_dir).glob(".step-*.pt.tmp"):
        tmp.unlink(missing_ok=True)


def _corrupt(path: Path, why: str, previous: Path | None) -> UserError:
    hint = (f"; the previous checkpoint is {previous}: resume from it with --resume {previous}"
            if previous is not None else "")
    return UserError(f"checkpoint {path} is corrupt or incomplete ({why}); nothing was "
                     f"loaded from it{hint}")


def read(path: Path, previous: Path | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint file; any damage is a `UserError` naming ``previous``
    (the checkpoint before it, if known) as the one to resume from instead."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _corrupt(path, f"not a complete archive: {exc}", previous) from None
    if bad is not None:
        raise _corrupt(path, f"record {bad} fails its CRC check", previous)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged pickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _corrupt(path, first, previous) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a localearn checkpoint (no '{FORMAT}' marker); it was "
                        "not loaded")
    if ckpt.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {ckpt.get('version')}, this "
                        f"localearn reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise _corrupt(path, f"missing entries: {', '.join(missing)}", previous)
    bad = nonfinite_in(ckpt)
    if bad is not None:
        hint = (f"; resume from the one before it with --resume {previous}"
                if previous is not None else "; resume from an earlier one")
        raise UserError(f"checkpoint {path} holds NaN, infinite or overflowing values ({bad}): "
                        f"the run had diverged; it was not loaded{hint}, e.g. with a lower "
                        "--lr")
    return ckpt


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


def saved_config(path: Path, previous: Path | None = None) -> dict[str, Any]:
    """The run settings stored in a checkpoint (read lazily, without loading the weights)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(ckpt["config"])
    except Exception:
        return read(path, previous)["config"]  # raises the precise error


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
RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl", "steps.jsonl", "config.json")
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
            raise UserError(f"run folder {_short(path)} cannot be made: "
                            f"{_os_problem(path, exc)}; name one with --out") from None
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


def _short(path: Path, n: int = 120) -> str:
    text = str(path)
    return text if len(text) <= n else f"{text[:n // 2]}...{text[-n // 2:]}"


def _os_problem(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be used as an output folder, in words."""
    if exc.errno == errno.ENAMETOOLONG:
        return "its name is too long (at most 255 bytes a name)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        p = Path(os.path.abspath(path))
        for parent in [p, *p.parents]:
            try:
                if parent.exists() and not parent.is_dir():
                    return f"{_short(parent)} is a file, not a folder"
            except OSError:
                continue
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "it is not writable (permission denied)"
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device {mount_point(path)}"
    return exc.strerror or type(exc).__name__


def usable_dir(out: Path) -> None:
    """Make the output folder ``out`` (and its parents) and check a file can be written
    there; else a one-line `UserError` saying why not (a file, under a file, read-only, a
    name too long, a full disk)."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"output folder {_short(out)} is a file; pick a folder with "
                            "--output-dir")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".localearn-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output folder {_short(out)} cannot be used: "
                        f"{_os_problem(out, exc)}; pick another --output-dir") from None


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
        what = (f"{s['rule']} on {s['model']}, {s['epochs']} epochs, test accuracy "
                f"{s['last_test_acc']:.2%}")
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


# ---------------------------------------------------------------------- compatibility
def check_config(ckpt: dict[str, Any], current: dict[str, Any], path: Path,
                 world_size: int) -> list[str]:
    """Refuse a checkpoint of another model or rule (or, mid-epoch, another data layout);
    return notices for changed settings that are allowed but break exactness."""
    old = ckpt["config"]

    def diff(keys: tuple[str, ...]) -> list[str]:
        return [f"{k} {old.get(k)!r} (now {current.get(k)!r})" for k in keys
                if old.get(k) != current.get(k)]

    structural = diff(STRUCTURE)
    if structural:
        raise UserError(f"checkpoint {path} belongs to another run: {', '.join(structural)}; "
                        "pass the settings it was trained with, or start a new run")
    mid_epoch = not ckpt["epoch_done"]
    layout = diff(DATA_LAYOUT)
    old_world = ckpt.get("world_size", 1)
    if old_world != world_size:
        layout.append(f"world size {old_world} (now {world_size})")
    if layout and mid_epoch:
        raise UserError(f"checkpoint {path} was written mid-epoch with {', '.join(layout)}; "
                        "resume it with the same settings, or from an epoch-end checkpoint")
    notes = layout + diff(TRAJECTORY)
    return [f"resuming with changed settings: {', '.join(notes)}; the run will not match an "
            "uninterrupted one"] if notes else []


def layout_changed(ckpt: dict[str, Any], current: dict[str, Any], world_size: int) -> bool:
    """True if the samples making up each step differ from the checkpoint's (batch size,
    train limit, seed, number of processes)."""
    old = ckpt["config"]
    return (any(old.get(k) != current.get(k) for k in DATA_LAYOUT)
            or ckpt.get("world_size", 1) != world_size)


def check_state(module: nn.Module, state: dict[str, Any], what: str, path: Path) -> None:
    """Refuse ``state`` unless its keys and shapes match ``module`` exactly (checked before
    anything is copied, so a mismatch never leaves a module half-loaded)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    if shapes:
        problems.append(f"shape of {', '.join(shapes[:3])}")
    if problems:
        raise UserError(f"checkpoint {path} does not fit this run's {what}: "
                        f"{'; '.join(problems)}; it was not loaded")


# ---------------------------------------------------------------------------- export
def export_safetensors(path: Path, out: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the backbone weights of a checkpoint (a file or a run folder: its final
    ``checkpoint.pt`` or newest step checkpoint) to safetensors, under the plain backbone's
    parameter names, so ``registry model(num_classes=...)`` loads them for inference. The
    network is built by `localearn.build.build_run`, as for training. The file is written
    atomically; a folder, a checkpoint, or (without ``overwrite``) any existing file is refused
    as the target."""
    from safetensors.torch import save

    from localearn.build import build_run
    from localearn.config import FitConfig
    from localearn.interfaces import DataInfo

    path = Path(path)
    if path.is_dir():
        final = path / "checkpoint.pt"
        path = final if final.is_file() else resolve("latest", path)[0]
    out = Path(out) if out is not None else path.with_suffix(".safetensors")
    check_export_target(path, out, overwrite)  # before the work: refuse early
    ckpt = read(path)
    cfg = ckpt["config"]
    num_classes = ckpt.get("num_classes")
    input_shape = ckpt.get("input_shape")
    if num_classes is None or input_shape is None:
        raise UserError(f"checkpoint {path} lacks num_classes/input_shape; it cannot be "
                        "exported")
    saved = ckpt.get("data_info", {})
    info = DataInfo(num_classes, tuple(input_shape), tuple(saved.get("mean", ())),
                    tuple(saved.get("std", ())), tuple(saved.get("class_names", ())))
    settings = {k: v for k, v in cfg.items() if k in FitConfig.model_fields}
    run = build_run(FitConfig.model_validate({
        **settings, "device": "cpu", "compile": False, "sync_bn": False, "nproc": 1,
        "data_dir": None, "resume": None, "seeds": None}), info=info)
    net = run.net
    check_state(net, ckpt["model"], "model", path)
    net.load_state_dict(ckpt["model"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
    metadata = export_metadata(cfg, ckpt, info)
    atomic_write_bytes(out, save(tensors, metadata=metadata))
    return out


def export_metadata(cfg: dict[str, Any], ckpt: dict[str, Any], info: Any) -> dict[str, str]:
    """What a user of an exported file needs besides the weights, as safetensors metadata
    (strings; lists as JSON): the registered model, the number of classes, the input shape
    (C, H, W), the normalisation mean and std, the dataset and its class names in label
    order, and where the weights came from (rule, step)."""
    return {"format": "localearn-backbone", "model": cfg["model"],
            "num_classes": str(info.num_classes),
            "input_shape": json.dumps(list(info.input_shape)),
            "mean": json.dumps(list(info.mean)), "std": json.dumps(list(info.std)),
            "dataset": str(cfg.get("dataset", "")),
            "class_names": json.dumps(list(info.class_names)),
            "rule": cfg["rule"], "step": str(ckpt["step"])}


def read_export_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """`export_metadata` decoded: numbers as int, lists as tuples."""
    out: dict[str, Any] = dict(meta)
    for key in ("num_classes", "step"):
        if key in out:
            out[key] = int(out[key])
    for key in ("input_shape", "mean", "std", "class_names"):
        if key in out:
            out[key] = tuple(json.loads(out[key]))
    return out


def check_export_target(source: Path, out: Path, overwrite: bool = False) -> None:
    """Refuse an export target that is a folder, the checkpoint being read, any checkpoint,
    or (without ``overwrite``) any existing file."""
    try:
        if out.is_dir():
            raise UserError(f"-o {_short(out)} is a folder; give a file name, e.g. "
                            f"{_short(out / 'model.safetensors')}")
        exists = out.exists()
        same = exists and source.exists() and out.resolve() == source.resolve()
    except OSError as exc:
        raise UserError(f"-o {_short(out)} cannot be used: {_os_problem(out, exc)}") from None
    if same:
        raise UserError(f"-o {out} is the checkpoint being exported; writing there would "
                        "replace it: pick another file")
    if exists and _is_checkpoint(out):
        raise UserError(f"-o {out} is a checkpoint; exporting there would replace it: pick "
                        "another file")
    if exists and not overwrite:
        raise UserError(f"-o {out} exists; pass --overwrite to replace it, or pick another "
                        "file")


def _is_checkpoint(path: Path) -> bool:
    """A torch.save archive (a zip file holding a ``data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
