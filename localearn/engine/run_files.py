"""A run's files: checkpoints written through the run's `CheckpointManager` (refusing a
diverged state), resume from a saved run, a fresh run's folder, and the message and checkpoint
when a signal stops the run. Part of `Trainer`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from localearn import distributed as dist_
from localearn.build import seed_everything
from localearn.config import FitConfig
from localearn.engine import checkpoint as ckpt_io
from localearn.engine import rundir
from localearn.engine.checkpoint import SavedRun
from localearn.engine.saving import CheckpointManager, TrainingDiverged
from localearn.engine.signals import TrainingInterrupted
from localearn.runlog import LOGGER


class RunFiles:
    """The checkpoint half of `Trainer` (its training half is `EpochLoop`)."""

    cfg: FitConfig
    env: Any
    run: Any
    net: Any
    aux: Any
    rule: Any
    stepper: Any
    feed: Any
    state: Any
    ckpt: CheckpointManager
    steps_per_epoch: int
    step: int
    epoch: int
    _signals: Any

    def _interrupted(self) -> TrainingInterrupted:
        """Write a checkpoint of the steps done (if any since the last one) and say how to go
        on; the exception to raise."""
        signum = self._signals.signum or signal.SIGINT
        name = signal.Signals(signum).name
        state = self.state
        last = self.last_checkpoint
        if self.step > 0 and (last is None or rundir.step_path(self.cfg.output_dir, self.step)
                              != last):
            last = self.save_checkpoint()
        where = (f"step {self.step} (epoch {state.epoch}, batch {state.batch_in_epoch} of "
                 f"{self.steps_per_epoch})")
        if last is None:
            msg = f"stopped by {name} at {where}, before any checkpoint: nothing to resume"
        else:
            msg = (f"stopped by {name} at {where}; checkpoint {last}; continue with: "
                   f"localearn fit --resume {last}")
        return TrainingInterrupted(msg, 128 + signum)

    def _diverged(self, value: float, epoch: int) -> None:
        keep = self.ckpt.good_checkpoint()
        raise TrainingDiverged(
            f"the loss became {value} at step {self.step + 1} (epoch {epoch}); training "
            f"stopped before that step was applied and nothing was saved after it; {keep}; "
            f"the learning rate is {self.cfg.lr}")

    def _sync_buffers(self) -> None:
        self._drain(self.state.epoch)
        self.stepper.sync(self.aux)  # (BatchNorm statistics averaged over replicas)

    def _meta(self) -> dict[str, Any]:
        """What describes the run in its checkpoints (beside the components' own state)."""
        info = self.run.info
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "config": self.cfg.model_dump(mode="json"), "world_size": self.env.world_size,
            "num_classes": info.num_classes, "input_shape": list(info.input_shape),
            "data_info": {"mean": list(info.mean), "std": list(info.std),
                          "class_names": list(info.class_names)},
            "model_k": self.net.k,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly, each part's own state (without RNG
        states: see `save_checkpoint`)."""
        return self.ckpt.state_dict()

    @property
    def last_checkpoint(self) -> Path | None:
        return self.ckpt.last

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N.pt`` atomically (rank 0) and prune old ones; refuse
        non-finite state (`TrainingDiverged`); a failed write leaves the previous checkpoint as
        it was and says so."""
        self._sync_buffers()
        bad = self.ckpt.first_nonfinite()
        if bad is not None:
            raise TrainingDiverged(
                f"{bad} became NaN, infinite or overflowing (beyond 1.8e19) by step "
                f"{self.step} (epoch {self.state.epoch}): the run diverged, so no checkpoint "
                f"was written with it; {self.ckpt.good_checkpoint()}; "
                f"the learning rate is {self.cfg.lr}")
        return self.ckpt.save(rundir.step_path(self.cfg.output_dir, self.step),
                              self.cfg.keep_checkpoints)

    def resume(self, spec: str) -> Path:
        """Load the saved run ``spec`` names (see `rundir.resolve`) and continue from it, in
        the output folder (see `rundir.claim_run_dir`)."""
        cfg, env = self.cfg, self.env
        found = rundir.resolve(spec, cfg.output_dir) if env.is_main else None
        path, previous = dist_.broadcast_object(found, env)
        saved = SavedRun(path, ckpt_io.read(path, previous), previous)
        current = cfg.model_dump(mode="json")
        notes = ckpt_io.check_config(saved.state, current, path, env.world_size)
        self.ckpt.check(saved)
        self.ckpt.claim(cfg.output_dir, resume_from=path, overwrite=cfg.overwrite)
        self.ckpt.load(saved)  # everything checked: now load
        if self.run.ema is not None and not saved.state.get("ema"):
            self.run.ema.restart(self.net)  # a run saved without one: average from here
        rngs = saved.state.get("rng") or []
        if len(rngs) == env.world_size:
            ckpt_io.set_rng_state(rngs[env.rank])
            self.feed.resume_rng = rngs[env.rank]
        else:
            seed_everything(cfg.seed + env.rank + self.step)
        if self.state.epoch_done and ckpt_io.layout_changed(saved.state, current,
                                                            env.world_size):
            # other batches from here on: the schedule restarts its count from the plan
            self.step = self.epoch * self.steps_per_epoch
            self.state.short = 0
        if env.is_main:
            for note in notes:
                LOGGER.info(f"note: {note}")
            if cfg.nproc > 1 or cfg.stages > 1:
                LOGGER.info(f"note: resuming on {cfg.nproc * cfg.stages} processes "
                            f"(--nproc {cfg.nproc}, --stages {cfg.stages}, as stored unless "
                            "given on the command line)")
            where = ("end of epoch" if self.state.epoch_done
                     else f"batch {self.state.batch_in_epoch}/{self.steps_per_epoch} of epoch")
            LOGGER.info(f"resuming from {path}: step {saved.step}, {where} {self.epoch}")
        return path

    def _fresh_start(self) -> None:
        """A new run: in a new folder under `rundir.RUNS_ROOT` when no ``output_dir`` is
        named, else in ``output_dir``, refusing to replace another run's files unless
        ``overwrite`` (see `rundir.claim_run_dir`)."""
        cfg = self.cfg
        if cfg.output_dir is not None:
            self.ckpt.claim(cfg.output_dir, resume_from=None, overwrite=cfg.overwrite)
            return
        made = self.ckpt.new_folder(rundir.run_name(self.rule.expression, cfg.model,
                                                    self.net.k))
        self.cfg = cfg.model_copy(update={"output_dir": made})

