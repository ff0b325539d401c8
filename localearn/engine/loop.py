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

The trainer is three parts: this file wires the run and drives its epochs; `EpochLoop`
(``epoch.py``) trains one epoch; `RunFiles` (``run_files.py``) writes checkpoints, resumes and
claims the run folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm  # a widget in a notebook, text on a terminal

from localearn import distributed as dist_
from localearn.build import build_run, resolve_device, seed_everything
from localearn.config import FitConfig
from localearn.engine import rundir
from localearn.engine.atomic import atomic_copy, atomic_save, atomic_write_text
from localearn.engine.epoch import SHORT_EPOCH, EpochLoop
from localearn.engine.feed import BatchFeed
from localearn.engine.report import FitResult, best_of, evaluate, run_summary, summary_text
from localearn.engine.run_files import RunFiles
from localearn.engine.saving import CheckpointManager, TrainingDiverged, WithPosition
from localearn.engine.schedule import make_schedule, warmup_cosine
from localearn.engine.signals import StopSignals, TrainingInterrupted
from localearn.engine.state import RunState
from localearn.errors import UserError
from localearn.interfaces import UpdateRule
from localearn.runlog import LOGGER, RunLog, console_logging, require_tensorboard

__all__ = ["SHORT_EPOCH", "FitResult", "Trainer", "TrainingDiverged", "TrainingInterrupted",
           "atomic_save", "evaluate", "fit", "resolve_device", "seed_everything",
           "warmup_cosine"]


class Trainer(EpochLoop, RunFiles):
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
                 "step": self.step, "total_steps": self.total_steps}),
             **({"ema": run.ema} if run.ema is not None else {})},
            self.state, self._meta, env)
        self.log = RunLog(cfg.output_dir or rundir.RUNS_ROOT, enabled=False)  # see _fit
        self._bar: tqdm | None = None
        self._signals = StopSignals(announce=env.is_main)
        self._stopped = False  # the current epoch was cut short by a signal

    @property
    def eval_net(self) -> Any:
        """The network evaluation uses: the weight average with ``--ema-decay``, else the
        trained network."""
        return self.net if self.run.ema is None else self.run.ema.module

    def summary(self, result: FitResult) -> dict[str, Any]:
        """The run's summary (``summary.json``, `report.run_summary`)."""
        return run_summary(self, result)

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> FitResult:
        console_logging()  # unless the caller set up logging of their own
        with self._signals:
            return self._fit()

    def _fit(self) -> FitResult:
        self.started = time.perf_counter()
        try:
            self._start()
            for epoch in range(self.epoch + 1 if self.state.epoch_done else self.epoch,
                               self.cfg.epochs + 1):
                row = self.train_epoch(epoch)
                if self._stopped:
                    raise self._interrupted()
                self._end_of_epoch(epoch, row)
                self._close_epoch(epoch, row)
                if dist_.all_sum([float(self._signals.signum is not None)], self.device,
                                 self.env)[0] and epoch < self.cfg.epochs:
                    raise self._interrupted()  # a signal during evaluation
            return self._finish()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.log.close()
            self.ckpt.release()
            if self._owns_group:
                dist_.destroy_process_group()
                self._owns_group = False

    def _start(self) -> None:
        """Claim the run folder (new or resumed), open the logs, say what is trained."""
        if self.cfg.tensorboard:
            require_tensorboard()
        if self.cfg.resume:
            self.resume(self.cfg.resume)
        else:
            self._fresh_start()
        cfg, env = self.cfg, self.env
        self.log = RunLog(cfg.output_dir, enabled=env.is_main, tensorboard=cfg.tensorboard)
        self.log.start(cfg.model_dump(mode="json"), self.history, self.step)
        if env.is_main:
            procs = f", {env.world_size} processes" if env.enabled else ""
            held = ("" if self.data.val is None else f" ({len(self.data.val)} training images "
                    "held out for validation)")
            LOGGER.info(f"training {self.rule.expression} on {cfg.model} (K={self.net.k}) "
                        f"with {cfg.dataset}: {len(self.data.train)} train / "
                        f"{len(self.data.test)} test images{held}, device {self.device}{procs}, "
                        f"precision {cfg.precision}; run folder {cfg.output_dir}")
        self._bar = tqdm(total=self.total_steps, initial=min(self.step, self.total_steps),
                         leave=False, dynamic_ncols=True, unit="step",
                         disable=not (cfg.progress and env.is_main and _is_terminal()))

    def _close_epoch(self, epoch: int, row: dict) -> None:
        """Evaluate the finished epoch, log it, checkpoint it, keep the best epoch's."""
        cfg, env = self.cfg, self.env
        self._sync_buffers()
        dist_.check_replicas([*self.net.named_parameters(), *self.aux.named_parameters()],
                             self.device, env)
        for name, loader in (("val_acc", self.feed.val), ("test_acc", self.test_loader)):
            if loader is not None:
                row[name] = evaluate(self.eval_net, loader, self.device,
                                     precision=cfg.precision,
                                     channels_last=cfg.channels_last, env=env)
        self.state.epoch_done = True
        self.history.append(row)
        row["best_test_acc"], row["best_epoch"] = best_of(self.history)
        self.log.epoch(row)
        if env.is_main:
            self._bar.clear()
            val = f"val acc {row['val_acc']:.2%}  " if "val_acc" in row else ""
            LOGGER.info(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                        f"train acc {row['train_acc']:.2%}  {val}test acc "
                        f"{row['test_acc']:.2%}  "
                        f"({row['epoch_time']:.1f}s, {row['images_per_s']:.0f} img/s)")
        self.save_checkpoint()
        saved = self.last_checkpoint
        if row["best_epoch"] == epoch and env.is_main and saved is not None:
            atomic_copy(saved, cfg.output_dir / "best.pt")  # the best epoch so far (on val)

    def _finish(self) -> FitResult:
        """The final checkpoint, the result and ``summary.json``."""
        self._bar.close()
        out = self.cfg.output_dir
        if not self.history:
            raise UserError(f"nothing to report: no epoch finished in {out}")
        final = self.ckpt.finish(out)
        last = self.history[-1]
        best, best_epoch = best_of(self.history)
        result = FitResult(last["test_acc"], last["train_loss"], self.history, self.step,
                           final, best, best_epoch, net=self.net, aux=self.aux,
                           rule=self.rule, run_dir=out)
        result.summary = self.summary(result)
        if self.env.is_main:
            atomic_write_text(out / "summary.json", json.dumps(result.summary, indent=2))
            LOGGER.info(summary_text(result.summary))
            LOGGER.info(f"wrote {self.log.metrics_path}, {out / 'summary.json'} and {final}")
        return result


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
