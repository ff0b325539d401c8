"""Saved runs: the checkpoint format, its integrity and structure checks, and the one reader
(`SavedRun`) that resume, ``export``, ``analyze`` and ``evaluate`` all go through.

A checkpoint is a `torch.save` file (a zip archive with a CRC-32 per record) holding a plain
dict: the model, the auxiliary networks (heads, EMA twins...), any rule state, optimizer,
gradient scaler, schedule position, the weight average (``ema``, with ``--ema-decay``), every
rank's RNG states, the data position (epoch and batches done in it), the epoch's running train
statistics and the history so far. It loads with ``torch.load(path, weights_only=True)``.

Before anything is used, the archive's CRCs are checked, the structure of every field is
validated (a file that unpickles safely can still hold a malformed history or optimizer state)
and, on resume, the contents are checked against the run; a damaged or mismatched file, or one
holding NaN or infinite weights or optimizer state, is refused with a one-line `UserError`,
never half-loaded. Writing them (atomically) is `localearn.engine.atomic`'s; where they live is
`localearn.engine.rundir`'s.
"""

from __future__ import annotations

import random
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from localearn.config import FitConfig
from localearn.engine.atomic import (  # noqa: F401  (re-exported: where callers found them)
    WriteFailed,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    write_failed,
)
from localearn.engine.rundir import (  # noqa: F401  (re-exported)
    RUN_FILES,
    RUNS_ROOT,
    checkpoint_dir,
    claim_run_dir,
    clear_run,
    drop_empty_checkpoint_dir,
    held_run,
    latest_run,
    list_checkpoints,
    new_run_dir,
    prune,
    resolve,
    run_dir_of,
    run_name,
    step_path,
    unfinished,
    usable_dir,
)
from localearn.errors import UserError
from localearn.interfaces import DataInfo

FORMAT = "localearn-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "config", "step", "epoch", "batch_in_epoch", "epoch_done",
            "model", "aux", "optimizer")

#: settings that define what is trained: a checkpoint with other values cannot be loaded
STRUCTURE = ("rule", "model", "k", "split", "dataset", "optimizer")
#: settings that fix which samples make up each step: may change only at an epoch boundary
DATA_LAYOUT = ("batch_size", "train_limit", "seed", "drop_last", "val_split")
#: settings that change the trajectory: allowed, with a notice that the run is no longer exact
TRAJECTORY = ("epochs", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs",
              "warmup_lr", "precision", "schedule", "betas", "eps", "decay_on", "clip_grad",
              "clip_scope", "label_smoothing", "mixup", "cutmix", "randaugment", "ema_decay")


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
             "ema": ckpt.get("ema"),
             "optimizer": (ckpt.get("optimizer") or {}).get("state")}
    return first_nonfinite(named_tensors({k: v for k, v in parts.items() if v is not None}))


#: where the averaged network's entries start in a checkpoint's ``ema`` (`WeightEma`)
EMA_PREFIX = "ema.module."


def evaluated_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights a run evaluated: its weight average (``--ema-decay``) when it kept
    one, else the trained weights (``model``)."""
    ema = ckpt.get("ema")
    if ema:
        return {k[len(EMA_PREFIX):]: v for k, v in ema.items() if k.startswith(EMA_PREFIX)}
    return ckpt["model"]


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
    why = malformed(ckpt)
    if why:
        raise _corrupt(path, why, previous)
    bad = nonfinite_in(ckpt)
    if bad is not None:
        hint = (f"; resume from the one before it with --resume {previous}"
                if previous is not None else "; resume from an earlier one")
        raise UserError(f"checkpoint {path} holds NaN, infinite or overflowing values ({bad}): "
                        f"the run had diverged; it was not loaded{hint}, e.g. with a lower "
                        "--lr")
    return ckpt


def saved_config(path: Path, previous: Path | None = None) -> dict[str, Any]:
    """The run settings stored in a checkpoint (read lazily, without loading the weights)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(ckpt["config"])
    except Exception:
        return read(path, previous)["config"]  # raises the precise error


# ---------------------------------------------------------------------- compatibility
def check_config(ckpt: dict[str, Any], current: dict[str, Any], path: Path,
                 world_size: int) -> list[str]:
    """Refuse a checkpoint of another model or rule (or, mid-epoch, another data layout);
    return notices for changed settings that are allowed but break exactness."""
    old = _with_defaults(ckpt["config"])

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


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings it predates at their defaults."""
    return {**{k: f.default for k, f in FitConfig.model_fields.items()}, **config}


def layout_changed(ckpt: dict[str, Any], current: dict[str, Any], world_size: int) -> bool:
    """True if the samples making up each step differ from the checkpoint's (batch size,
    train limit, seed, number of processes)."""
    old = _with_defaults(ckpt["config"])
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



# ------------------------------------------------------------------------- structure
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensors(d: Any) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                       for k, v in d.items())


def malformed(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a checkpoint's fields, or None: each field of the
    type the engine reads, so that a hostile or damaged file fails here, in one line, and not
    somewhere in the middle of a resume or an analysis."""
    if not isinstance(ckpt["config"], dict) or \
            not all(isinstance(ckpt["config"].get(k), (str, int)) for k in ("rule", "model")):
        return "malformed 'config': expected the run's settings, with its rule and model"
    for key in ("step", "epoch", "batch_in_epoch"):
        if not _is_int(ckpt[key]):
            return f"malformed {key!r}: expected a count, got {type(ckpt[key]).__name__}"
    if not isinstance(ckpt["epoch_done"], bool):
        return "malformed 'epoch_done': expected true or false"
    history = ckpt.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        return "malformed 'history': expected a list of epoch rows"
    sums = ckpt.get("epoch_sums")
    if sums is not None and (not isinstance(sums, list)
                             or not all(isinstance(v, (int, float)) for v in sums)):
        return "malformed 'epoch_sums': expected a list of numbers"
    for key in ("model", "aux"):
        if not _tensors(ckpt[key]):
            return f"malformed {key!r}: expected a state dict of named tensors"
    opt = ckpt["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not isinstance(groups, list) or not isinstance(opt.get("state"), dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list)
            and all(_is_int(i) for i in g["params"]) for g in groups):
        return "malformed 'optimizer': expected param_groups (each with its params) and state"
    rngs = ckpt.get("rng", [])
    if not isinstance(rngs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor)
            and isinstance(r.get("numpy"), dict) and isinstance(r.get("random"), dict)
            for r in rngs):
        return "malformed 'rng': expected each process's random-number states"
    if ckpt.get("ema") is not None and not _tensors(ckpt["ema"]):
        return "malformed 'ema': expected a state dict of named tensors"
    for key in ("rule", "scaler", "scheduler", "data_info"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f"malformed {key!r}: expected a dict"
    return None


# -------------------------------------------------------------------------- reading
#: settings a saved run is rebuilt with in one process, whatever it was trained with
ONE_PROCESS = {"device": "cpu", "compile": False, "sync_bn": False, "nproc": 1, "stages": 1,
               "stage_cuts": None, "data_dir": None, "resume": None, "seeds": None}


@dataclass
class SavedRun:
    """A saved run, read and checked once (`read`): resume, ``export``, ``analyze`` and
    ``evaluate`` all start here."""

    path: Path
    state: dict[str, Any]
    previous: Path | None = None  # the checkpoint before it, to suggest when this one fails

    @classmethod
    def open(cls, spec: str | Path, run_dir: Path | None = None) -> SavedRun:
        """``spec``: a checkpoint file, a run folder (its final ``checkpoint.pt``, else its
        newest step checkpoint) or ``latest`` (the newest in ``run_dir``, or under `RUNS_ROOT`
        with no ``run_dir``)."""
        target = Path(spec)
        if target.is_dir() and (target / "checkpoint.pt").is_file():
            path, previous = target / "checkpoint.pt", None
        else:
            path, previous = resolve(str(spec), run_dir)
        return cls(path, read(path, previous), previous)

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def info(self) -> DataInfo:
        """The data the run was trained on, as its heads saw it."""
        num_classes, shape = self.state.get("num_classes"), self.state.get("input_shape")
        if not _is_int(num_classes) or not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise UserError(f"checkpoint {self.path} lacks num_classes/input_shape; the run "
                            "cannot be rebuilt from it")
        saved = self.state.get("data_info") or {}
        return DataInfo(num_classes, tuple(shape), tuple(saved.get("mean", ())),
                        tuple(saved.get("std", ())), tuple(saved.get("class_names", ())),
                        str(self.config.get("dataset", "")))

    def fit_config(self, **overrides: Any) -> FitConfig:
        """The run's settings as a `FitConfig`, rebuilt in one process on the CPU unless
        ``overrides`` say otherwise (a pipelined or multi-process run included)."""
        settings = {k: v for k, v in self.config.items() if k in FitConfig.model_fields}
        try:
            return FitConfig.model_validate({**settings, **ONE_PROCESS, **overrides})
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"checkpoint {self.path} holds settings this localearn cannot "
                            f"use ({first})") from None
