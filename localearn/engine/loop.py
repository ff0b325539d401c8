"""The epoch loop: a slim `Trainer` that wires a run from `localearn.build.build_run` to its
data loaders, the learning-rate schedule, evaluation, logs, progress and periodic checkpoints.
One batch is `localearn.engine.step.Step`'s work, under the run's parallel strategy
(`localearn.engine.parallel`); the run's position is a `RunState`.

Steps are counted from the batches actually delivered. An epoch that delivers no batch is an
error; one that delivers fewer than planned re-plans the schedule from what was delivered (so
the learning rate still reaches its end, and a resumed run follows the same figures), and below
`SHORT_EPOCH` of the plan it is a warning in the log, in ``metrics.jsonl`` and in
``summary.json``. SIGINT and SIGTERM finish the current step, write a checkpoint and say how to
resume (exit 130 and 143); a second signal stops at once.

Without a named output folder each run gets a new one (`checkpoint.new_run_dir`), said at the
start. What the run says goes through the ``localearn`` logger (`localearn.runlog.LOGGER`) on
rank 0; the progress bar shows only when stdout is a terminal. At the end the run's summary
(`Trainer.summary`) is logged and saved as ``summary.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm  # a widget in a notebook, text on a terminal

from localearn import distributed as dist_
from localearn.build import build_run, resolve_device, seed_everything
from localearn.config import FitConfig
from localearn.engine import checkpoint as ckpt_io
from localearn.engine import rundir
from localearn.engine.atomic import atomic_copy, atomic_save, atomic_write_text
from localearn.engine.checkpoint import SavedRun
from localearn.engine.feed import BatchFeed
from localearn.engine.parallel import DataEnd, NonFiniteLoss
from localearn.engine.report import FitResult, best_of, evaluate, run_summary, summary_text
from localearn.engine.saving import CheckpointManager, TrainingDiverged, WithPosition
from localearn.engine.schedule import make_schedule, warmup_cosine
from localearn.engine.signals import StopSignals, TrainingInterrupted
from localearn.engine.state import RunState
from localearn.errors import UserError
from localearn.interfaces import UpdateRule
from localearn.runlog import (
    LOGGER,
    RunLog,
    console_logging,
    peak_memory_mb,
    require_tensorboard,
)

__all__ = ["SHORT_EPOCH", "FitResult", "Trainer", "TrainingDiverged", "TrainingInterrupted",
           "atomic_save", "evaluate", "fit", "resolve_device", "seed_everything",
           "warmup_cosine"]

#: an epoch delivering fewer than this share of its planned batches is a warning
SHORT_EPOCH = 0.5


class Trainer:
    """Everything one run needs, built from a validated `FitConfig`; ``rule``: an already made
    rule to train instead of building ``cfg.rule`` (the Python API's rule objects);
    ``command``: the command line that started the run, for its summary.

    In a process started by torchrun the trainer joins the job's process group (NCCL on GPUs,
    Gloo on CPUs), shards the data by rank and averages gradients across ranks; only rank 0
    writes files and prints.
    """

    def __init__(self, cfg: FitConfig, *, rule: UpdateRule | None = None,
                 command: str | None = None) -> None:
        if cfg.resume and cfg.output_dir is None:
            # continue in the folder the checkpoint is in, wherever it was moved or copied
            # (``latest``: the newest run under runs/)
            path, _ = rundir.resolve(cfg.resume, None)
            cfg = cfg.model_copy(update={"output_dir": rundir.run_dir_of(path)})
        self.cfg = cfg
        self.command = command
        self._given_rule = rule
        self.env = dist_.current_env()
        env = self.env
        if cfg.nproc > 1 and not env.enabled:
            raise UserError(f"nproc={cfg.nproc} launches processes from the command line "
                            f"(localearn fit --nproc {cfg.nproc}); from Python, start the "
                            "script with torchrun instead")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        per_stage = max(1, local_world // cfg.stages)
        if env.enabled and cfg.nproc not in (1, per_stage):
            raise UserError(f"--nproc {cfg.nproc} disagrees with the launcher, which started "
                            f"{local_world} processes on this node")
        if env.enabled and cfg.nproc == 1 and per_stage > 1:  # recorded as launched
            cfg = cfg.model_copy(update={"nproc": per_stage})
            self.cfg = cfg
        self.device = dist_.pick_device(cfg.device, env) if env.enabled else \
            resolve_device(cfg.device)
        self._owns_group = dist_.init_process_group(env, self.device)
        try:
            self._build()
        except BaseException:
            if self._owns_group:
                dist_.destroy_process_group()
            raise

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        run = build_run(cfg, device=self.device, env=env, rule=self._given_rule)
        self.run = run
        self.rule, self.net, self.aux, self.data = run.rule, run.net, run.aux, run.data
        self.optimizer, self.stepper, self.strategy = run.optimizer, run.step, run.strategy
        self.reducer = run.step.reducer
        self.scaler = run.step.scaler
        self.feed = BatchFeed(cfg, self.data, self.strategy, self.device, self.net.input_shape)
        self.train_loader, self.test_loader = self.feed.train, self.feed.test
        steps = self.feed.planned
        self.steps_per_epoch = steps  # planned; an epoch may deliver fewer (see `short`)
        self.schedule = make_schedule(cfg, steps)
        self.warmup_steps = self.schedule.warmup_steps
        self.state = RunState()
        self.ckpt = CheckpointManager(
            {"model": self.net, "aux": self.aux, "rule": self.rule,
             "optimizer": self.optimizer, "scaler": self.scaler,
             "scheduler": WithPosition(self.schedule, lambda: {
                 "step": self.step, "total_steps": self.total_steps})},
            self.state, self._meta, env)
        self.log = RunLog(cfg.output_dir or rundir.RUNS_ROOT, enabled=False)  # see _fit
        self._bar: tqdm | None = None
        self._signals = StopSignals(announce=env.is_main)
        self._stopped = False  # the current epoch was cut short by a signal

    # the run's position, kept in `state` (saved with every checkpoint)
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def total_steps(self) -> int:
        """The schedule's length: the planned batches of every epoch, less those that
        finished epochs did not deliver (so the learning rate reaches its end)."""
        return self.steps_per_epoch * self.cfg.epochs - self.state.short

    # ------------------------------------------------------------------------- training
    def set_lr(self) -> float:
        lr = self.schedule.lr(self.step, self.epoch, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (or its rest, after a resume); its summary row."""
        cfg, device, state = self.cfg, self.device, self.state
        self.net.train()
        self.aux.train()
        state.start_epoch(epoch)
        step_times: list[float] = []
        images_done = 0
        lr = self.set_lr()
        start = last = time.perf_counter()
        batches = self.feed.batches(epoch, state.batch_in_epoch)
        while True:
            try:
                images, targets = next(batches)
            except StopIteration:
                if state.batch_in_epoch < self.steps_per_epoch:
                    self.strategy.end_of_data()  # later pipelined stages stop here too
                break
            except Exception:
                if self._signals.signum is not None:  # loader workers hit by the signal too
                    self._stopped = True
                    break
                raise
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            lr = self.set_lr()
            self.stepper.stop_vote = self._signals.signum is not None
            try:
                totals = self.stepper(images, targets)
            except NonFiniteLoss as bad:
                self._diverged(bad.value, epoch)
            except DataEnd:  # a later stage: stage 0's stream ended early
                break
            state.add_step(totals)
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            images_done += int(totals[2])
            if self._stop_asked():
                self._stopped = True
                break
            self._after_batch(epoch, lr, totals, step_times[-1])
        images_done += self._drain(epoch)
        sums = state.epoch_sums
        seen = max(1.0, sums[2]) if sums else 1.0
        elapsed = time.perf_counter() - start
        return {"epoch": epoch, "step": state.step, "lr": lr,
                "batches": state.batch_in_epoch, "planned_batches": self.steps_per_epoch,
                "train_loss": sums[0] / seen if sums else float("nan"),
                "train_acc": sums[1] / seen if sums else float("nan"),
                "local_losses": [s / seen for s in sums[3:]],
                "images": int(sums[2]) if sums else 0,
                "epoch_time": elapsed,
                "step_time": sum(step_times) / max(1, len(step_times)),
                "images_per_s": images_done / elapsed if elapsed > 0 else 0.0,
                "peak_mem_mb": peak_memory_mb(device)}

    def _after_batch(self, epoch: int, lr: float, totals: list[float], step_time: float) -> None:
        """Progress bar, step log, periodic checkpoint."""
        cfg = self.cfg
        n = max(1.0, totals[2])
        if self._bar is not None:
            self._bar.set_description(f"epoch {epoch}/{cfg.epochs}", refresh=False)
            self._bar.set_postfix(loss=f"{totals[0] / n:.3f}", acc=f"{totals[1] / n:.1%}",
                                  img_s=f"{totals[2] / step_time:.0f}", refresh=False)
            self._bar.update()
        # every log_every steps, and each epoch's first and last (so short runs log too)
        if self.step % cfg.log_every == 0 or self.state.batch_in_epoch in (
                1, self.steps_per_epoch):
            self.log.step({"step": self.step, "epoch": epoch, "lr": lr,
                           "loss": totals[0] / n, "train_acc": totals[1] / n,
                           "local_losses": [v / n for v in totals[3:]],
                           "step_time": step_time, "images_per_s": totals[2] / step_time,
                           "peak_mem_mb": peak_memory_mb(self.device)})
        if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                and self.state.batch_in_epoch < self.steps_per_epoch):  # epoch ends save anyway
            self.save_checkpoint()

    def _stop_asked(self) -> bool:
        """A signal asked this run to stop (on any rank: the vote went with the step)."""
        if self.env.enabled:
            return self.stepper.stop_requested
        return self._signals.signum is not None

    def _end_of_epoch(self, epoch: int, row: dict) -> None:
        """Check what the epoch delivered against the plan: none is an error; fewer re-plans
        the schedule from what was delivered; fewer than `SHORT_EPOCH` of it is a warning."""
        delivered, planned = self.state.batch_in_epoch, self.steps_per_epoch
        if delivered == 0:
            stats = getattr(self.data.train, "skipped", None)
            why = (f" ({stats['samples']} undecodable samples and {stats['shards']} unreadable "
                   "shards so far)" if isinstance(stats, dict) else "")
            raise UserError(f"epoch {epoch} delivered no training batches of "
                            f"{self.cfg.batch_size} (planned {planned}){why}: there is nothing "
                            "to train on; check the training data")
        if delivered >= planned:
            return
        self.state.short += planned - delivered
        if self._bar is not None:
            self._bar.total = self.total_steps
        if delivered < SHORT_EPOCH * planned:
            msg = (f"epoch {epoch} delivered {delivered} of {planned} planned batches "
                   f"({delivered / planned:.0%}, below {SHORT_EPOCH:.0%}): samples are missing "
                   "(corrupt, unreadable, or fewer than the data's stated count); the schedule "
                   "was re-planned from the batches delivered")
            row["warning"] = msg
            if self.env.is_main:
                if self._bar is not None:
                    self._bar.clear()
                LOGGER.warning(msg)

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

    # ---------------------------------------------------------------------- checkpoints
    def _drain(self, epoch: int) -> int:
        """A pipelined step reads its statistics some steps late: add those not read yet to
        the epoch's sums; the images they count."""
        try:
            pending = self.stepper.drain()
        except NonFiniteLoss as bad:
            self._diverged(bad.value, epoch)
        if not pending:
            return 0
        sums = self.state.epoch_sums
        self.state.epoch_sums = [a + b for a, b in zip(sums, pending)] if sums else pending
        return int(pending[2])

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

    def summary(self, result: FitResult) -> dict[str, Any]:
        """The run's summary (``summary.json``, `report.run_summary`)."""
        return run_summary(self, result)

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> FitResult:
        console_logging()  # unless the caller set up logging of their own
        with self._signals:
            return self._fit()

    def _fit(self) -> FitResult:
        env = self.env
        self.started = time.perf_counter()
        try:
            if self.cfg.tensorboard:
                require_tensorboard()
            if self.cfg.resume:
                self.resume(self.cfg.resume)
            else:
                self._fresh_start()
            cfg = self.cfg
            out = cfg.output_dir
            self.log = RunLog(out, enabled=env.is_main, tensorboard=cfg.tensorboard)
            self.log.start(cfg.model_dump(mode="json"), self.history, self.step)
            first = self.epoch + 1 if self.state.epoch_done else self.epoch
            if env.is_main:
                procs = f", {env.world_size} processes" if env.enabled else ""
                LOGGER.info(f"training {self.rule.expression} on {cfg.model} (K={self.net.k}) "
                            f"with {cfg.dataset}: {len(self.data.train)} train / "
                            f"{len(self.data.test)} test images, device {self.device}{procs}, "
                            f"precision {cfg.precision}; run folder {out}")
            self._bar = tqdm(total=self.total_steps, initial=min(self.step, self.total_steps),
                             leave=False, dynamic_ncols=True, unit="step",
                             disable=not (cfg.progress and env.is_main and _is_terminal()))
            for epoch in range(first, cfg.epochs + 1):
                row = self.train_epoch(epoch)
                if self._stopped:
                    raise self._interrupted()
                self._end_of_epoch(epoch, row)
                self._sync_buffers()
                dist_.check_replicas([*self.net.named_parameters(),
                                      *self.aux.named_parameters()], self.device, env)
                row["test_acc"] = evaluate(self.net, self.test_loader, self.device,
                                           precision=cfg.precision,
                                           channels_last=cfg.channels_last, env=env)
                self.state.epoch_done = True
                self.history.append(row)
                row["best_test_acc"], row["best_epoch"] = best_of(self.history)
                self.log.epoch(row)
                if env.is_main:
                    self._bar.clear()
                    LOGGER.info(f"epoch {epoch}/{cfg.epochs}  train loss "
                                f"{row['train_loss']:.4f}  train acc {row['train_acc']:.2%}  "
                                f"test acc {row['test_acc']:.2%}  ({row['epoch_time']:.1f}s, "
                                f"{row['images_per_s']:.0f} img/s)")
                self.save_checkpoint()
                saved = self.last_checkpoint
                if row["best_epoch"] == epoch and env.is_main and saved is not None:
                    atomic_copy(saved, out / "best.pt")  # the best epoch so far, kept apart
                if dist_.all_sum([float(self._signals.signum is not None)], self.device,
                                 env)[0] and epoch < cfg.epochs:
                    raise self._interrupted()  # a signal during evaluation
            self._bar.close()
            if not self.history:
                raise UserError(f"nothing to report: no epoch finished in {out}")
            final = self.ckpt.finish(out)
            last = self.history[-1]
            best, best_epoch = best_of(self.history)
            result = FitResult(last["test_acc"], last["train_loss"], self.history, self.step,
                               final, best, best_epoch, net=self.net, aux=self.aux,
                               rule=self.rule, run_dir=out)
            result.summary = self.summary(result)
            if env.is_main:
                atomic_write_text(out / "summary.json", json.dumps(result.summary, indent=2))
                LOGGER.info(summary_text(result.summary))
                LOGGER.info(f"wrote {self.log.metrics_path}, {out / 'summary.json'} and "
                            f"{final}")
            return result
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.log.close()
            self.ckpt.release()
            if self._owns_group:
                dist_.destroy_process_group()
                self._owns_group = False


def fit(cfg: FitConfig, *, rule: UpdateRule | None = None,
        command: str | None = None) -> FitResult:
    """Train one run end to end; see `Trainer`."""
    return Trainer(cfg, rule=rule, command=command).fit()


def _is_terminal() -> bool:
    """Whether a person watches the output: stdout is a terminal, or this is a Jupyter kernel
    (its bar is a widget). A file or a pipe (a log, CI) gets no bar: it would be noise."""
    try:
        if sys.stdout.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"  # Jupyter, VS Code, Colab kernels
