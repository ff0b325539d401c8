"""A run's checkpoints, saved from components that each own their state (``state_dict`` /
``load_state_dict``: the network, the auxiliary networks, the rule, the optimizer, the gradient
scaler, the schedule, the run's position) through one `CheckpointManager`, which also claims and
holds the run's folder. Reading a saved run is `SavedRun`'s (`localearn.engine.checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localearn import distributed as dist_
from localearn.engine import checkpoint as ckpt_io
from localearn.engine import rundir
from localearn.engine.atomic import WriteFailed, atomic_save
from localearn.engine.checkpoint import SavedRun
from localearn.engine.state import RunState
from localearn.errors import UserError
from localearn.runlog import LOGGER

#: components whose state is a module's: checked key by key and shape by shape before loading
MODULES = {"model": "model", "aux": "auxiliary networks", "ema": "weight average"}


class TrainingDiverged(UserError):
    """The loss, the weights or the optimizer state became NaN or infinite; the run stopped
    before saving the diverged state."""


class WithPosition:
    """A component (the schedule) saved with where the run stands (``position()``: its step
    and planned steps), so that a checkpoint says which learning rate comes next."""

    def __init__(self, component: Any, position: Callable[[], dict[str, Any]]) -> None:
        self.component, self.position = component, position

    def state_dict(self) -> dict[str, Any]:
        return {**self.component.state_dict(), **self.position()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.component.load_state_dict(state)


class CheckpointManager:
    """Saves and loads a run: ``components`` by their checkpoint key, ``state`` (the run's
    position, stored at the top level), ``meta`` (what describes the run: format, settings,
    data). Rank 0 writes; every process raises alike."""

    def __init__(self, components: dict[str, Any], state: RunState,
                 meta: Callable[[], dict[str, Any]], env: dist_.DistEnv) -> None:
        self.components, self.state, self.meta, self.env = components, state, meta, env
        self.last: Path | None = None  # the newest checkpoint written or resumed from
        self.resumed_from: Path | None = None
        self._lock: rundir.RunLock | None = None

    # -- saving
    def state_dict(self) -> dict[str, Any]:
        return {**self.meta(), **self.state.state_dict(),
                **{name: c.state_dict() for name, c in self.components.items()}}

    def first_nonfinite(self) -> str | None:
        """The first weight, buffer or optimizer value that is NaN, infinite or beyond
        `checkpoint.OVERFLOW` (no such checkpoint is good), else None."""
        c = self.components
        return ckpt_io.first_nonfinite([
            *ckpt_io.named_tensors(c["model"].state_dict(), "model"),
            *ckpt_io.named_tensors(c["aux"].state_dict(), "aux"),
            *ckpt_io.named_tensors(c["optimizer"].state_dict()["state"], "optimizer"),
            *ckpt_io.named_tensors(c["rule"].state_dict() or {}, "rule")])

    def good_checkpoint(self) -> str:
        """Where a diverged run can go back to, in words."""
        last = self.last
        if last is None:
            return "no checkpoint had been written yet"
        if last == self.resumed_from:
            return (f"this run resumed from {last} and diverged again from it: that state is "
                    "past saving; resume an earlier checkpoint or start again with a lower --lr")
        return (f"the last good checkpoint is {last} (resume it with --resume {last}, e.g. "
                f"with a lower --lr)")

    def save(self, path: Path, keep: int) -> Path:
        """Write ``path`` atomically (rank 0) with every process's RNG states and keep the
        newest ``keep`` step checkpoints; a failed write leaves the previous checkpoint as it
        was and says so."""
        rngs = dist_.gather_objects(ckpt_io.rng_state(), self.env)
        failed = None
        if self.env.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            try:
                # room first: checkpoints beyond ``keep`` (a run resumed with a lower
                # --keep-checkpoints, say on a full disk) go before the new one is written
                rundir.prune(rundir.run_dir_of(path), keep, spare=self.last)
                atomic_save(state, path)
                rundir.prune(rundir.run_dir_of(path), keep)
            except WriteFailed as exc:
                last = self.last
                when = "there is room" if exc.no_space else "it can be written"
                kept = (f"the previous checkpoint {last} is intact: once {when}, continue with "
                        f"--resume {last}" if last is not None and last.is_file()
                        else "no earlier checkpoint was written")
                failed = f"{exc} (the partial file was removed); {kept}"
        failed = dist_.broadcast_object(failed, self.env)
        if failed:
            raise UserError(failed)
        self.last = path
        return path

    # -- loading
    def check(self, saved: SavedRun) -> None:
        """Refuse a saved run whose modules or optimizer do not fit these components (before
        anything is loaded, so nothing is ever half-loaded)."""
        for name, what in MODULES.items():
            if name not in self.components or saved.state.get(name) is None:
                continue  # a weight average: only in runs with one
            ckpt_io.check_state(self.components[name], saved.state[name], what, saved.path)
        own = [len(g["params"]) for g in self.components["optimizer"].state_dict()["param_groups"]]
        theirs = [len(g["params"]) for g in saved.state["optimizer"]["param_groups"]]
        if own != theirs:
            raise UserError(f"checkpoint {saved.path} does not fit this run's optimizer: "
                            f"parameter groups of sizes {theirs}, this run has {own}; it was "
                            "not loaded")

    def load(self, saved: SavedRun) -> None:
        """Every component from ``saved`` (those it holds state for), then the position."""
        for name, component in self.components.items():
            value = saved.state.get(name)
            if value and (name != "scaler" or component.is_enabled()):
                component.load_state_dict(value)
        self.state.load_state_dict(saved.state)
        self.last = self.resumed_from = saved.path

    # -- the run's folder
    def claim(self, out: Path, *, resume_from: Path | None, overwrite: bool) -> None:
        """Make ``out`` this run's folder and hold it for the whole run (rank 0 decides,
        every process raises alike)."""
        error = None
        if self.env.is_main:
            try:
                rundir.usable_dir(out)
                self._hold(out)
                rundir.claim_run_dir(out, resume_from=resume_from, overwrite=overwrite)
            except UserError as exc:
                error = str(exc)
        error = dist_.broadcast_object(error, self.env)
        if error:
            raise UserError(error)

    def new_folder(self, name: str) -> Path:
        """A new folder under `rundir.RUNS_ROOT` (rank 0 makes it), held for the run."""
        made = error = None
        if self.env.is_main:
            try:
                made = rundir.new_run_dir(name)
                self._hold(made)
            except UserError as exc:
                error = str(exc)
        made, error = dist_.broadcast_object((made, error), self.env)
        if error:
            raise UserError(error)
        return made

    def _hold(self, folder: Path) -> None:
        if self._lock is None:
            self._lock = rundir.RunLock(folder)
            note = self._lock.acquire()
            if note:
                LOGGER.info(f"note: {note}")

    def finish(self, out: Path) -> Path:
        """Keep the final state as ``RUN_DIR/checkpoint.pt``; drop the step checkpoints."""
        final = out / "checkpoint.pt"
        if self.env.is_main and self.last is not None and self.last.is_file():
            for old in rundir.list_checkpoints(out):
                if old != self.last:
                    old.unlink(missing_ok=True)
            os.replace(self.last, final)
            rundir.drop_empty_checkpoint_dir(out)
        dist_.barrier(self.env)
        return final

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

