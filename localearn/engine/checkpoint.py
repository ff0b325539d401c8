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
a damaged or mismatched file is refused with a `UserError`, never half-loaded.
"""

from __future__ import annotations

import os
import random
import re
import zipfile
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


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    return ckpt


def _run_files(run_dir: Path) -> list[Path]:
    """A run's step checkpoints, or its final ``checkpoint.pt`` once it has finished."""
    files = list_checkpoints(run_dir)
    final = run_dir / "checkpoint.pt"
    return files if files or not final.is_file() else [final]


def resolve(resume: str, run_dir: Path) -> tuple[Path, Path | None]:
    """The checkpoint ``--resume`` names (a file, a run folder, or ``latest`` for the newest in
    ``run_dir``) and the one before it in its folder (None if none)."""
    if resume == "latest":
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
def export_safetensors(path: Path, out: Path | None = None) -> Path:
    """Write the backbone weights of a checkpoint (a file or a run folder: its final
    ``checkpoint.pt`` or newest step checkpoint) to safetensors, under the plain backbone's
    parameter names, so ``registry model(num_classes=...)`` loads them for inference. The
    network is built by `localearn.build.build_run`, as for training."""
    from safetensors.torch import save_file

    from localearn.build import build_run
    from localearn.config import FitConfig
    from localearn.interfaces import DataInfo

    path = Path(path)
    if path.is_dir():
        final = path / "checkpoint.pt"
        path = final if final.is_file() else resolve("latest", path)[0]
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
    out = Path(out) if out is not None else path.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"model": cfg["model"],
                                           "num_classes": str(num_classes),
                                           "rule": cfg["rule"], "step": str(ckpt["step"])})
    return out
