"""The engine: builds the run from a `FitConfig` through the registry and trains any rule.

Per batch: ``rule.train_step`` (all forward and backward passes of the rule, under autocast when
``precision`` is bf16 or 16), the gradient average across ranks (`localearn.distributed`), one
optimizer step over backbone and auxiliary parameters (through the gradient scaler for fp16),
``rule.after_step``. Evaluation uses the backbone's own classifier only; auxiliary networks are
training-only.

A run is resumable at every checkpoint (`localearn.checkpoint`): the data order and the
augmentation of each sample are functions of (seed, epoch, position) (`localearn.sampling`), so
a run killed at any point and resumed from its last checkpoint ends bitwise equal to an
uninterrupted one on the same hardware. See docs/engine.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from localearn import checkpoint as ckpt_io
from localearn import distributed as dist_
from localearn import expr, registry
from localearn.checkpoint import atomic_save
from localearn.config import FitConfig
from localearn.data import DataSplits, make_loader
from localearn.errors import UserError
from localearn.interfaces import LocalModuleSplitter, SplitNetwork, UpdateRule
from localearn.runlog import RunLog, peak_memory_mb
from localearn.sampling import SeededSamples, ShardSampler, sample_seed

__all__ = ["FitResult", "Trainer", "TrainingDiverged", "atomic_save", "build_network",
           "evaluate", "find_splitter", "fit", "load_data", "resolve_device", "seed_everything",
           "warmup_cosine"]

AMP_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped before saving the diverged state."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use "
                        "--device cpu")
    return device


def find_splitter(backbone: nn.Module, model_name: str) -> LocalModuleSplitter:
    """The first registered splitter that accepts ``backbone``."""
    for name in registry.available("splitter"):
        splitter = registry.load("splitter", name)()
        if splitter.accepts(backbone):
            return splitter
    raise UserError(f"no registered splitter can cut model {model_name!r}; registered "
                    f"splitters: {', '.join(registry.available('splitter'))}")


def build_network(model: str, k: int | None, rule: UpdateRule, num_classes: int,
                  input_shape: tuple[int, int, int], split: str = "even") -> SplitNetwork:
    """Backbone from the registry, cut into the K the rule agrees to (validated here)."""
    backbone = registry.load("model", model)(num_classes=num_classes)
    splitter = find_splitter(backbone, model)
    num_units = len(splitter.units(backbone))
    k = rule.num_modules(k, num_units)
    if not 1 <= k <= num_units:
        raise UserError(f"K={k} is out of range for model {model!r}: valid K is 1..{num_units}")
    return splitter.split(backbone, k, input_shape, policy=split)


def load_data(cfg: FitConfig) -> DataSplits:
    factory = registry.load("dataset", cfg.dataset)
    return factory(cfg.data_dir, download=cfg.download, train_limit=cfg.train_limit,
                   test_limit=cfg.test_limit, seed=cfg.seed)


def warmup_cosine(step: int, total: int, warmup: int, lr: float, warmup_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 for ``precision`` "bf16"/"16"; a no-op for "32"."""
    if precision not in AMP_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, device: torch.device, *,
             precision: str = "32", channels_last: bool = False,
             env: dist_.DistEnv | None = None) -> float:
    """Top-1 accuracy of the backbone's own classifier (summed over ranks when ``env`` is a
    multi-process job and each rank's loader holds its share of the test set)."""
    was_training = net.training
    net.eval()
    correct = total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = net(images)
        correct += (logits.argmax(1) == targets).sum().item()
        total += len(targets)
    net.train(was_training)
    if env is not None and env.enabled:
        correct, total = dist_.all_sum([correct, total], device, env)
    return correct / max(1, total)


@dataclass
class FitResult:
    test_acc: float
    train_loss: float
    history: list[dict] = field(default_factory=list)
    step: int = 0
    checkpoint: Path | None = None


def rules_of(rule: UpdateRule) -> list[UpdateRule]:
    """``rule`` and every rule nested in it (a decorator's base), so engine hooks reach all."""
    out: list[UpdateRule] = []
    todo, seen = [rule], set()
    while todo:
        r = todo.pop()
        if id(r) in seen:
            continue
        seen.add(id(r))
        out.append(r)
        for value in vars(r).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            todo.extend(x for x in items if isinstance(x, UpdateRule))
    return out


def _callables(module: nn.Module) -> Iterator[nn.Module]:
    """The modules a rule calls inside its auxiliary module: what is not a plain list or
    dict of modules (heads, copies, twins)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        for child in module.children():
            yield from _callables(child)
    else:
        yield module


class Trainer:
    """Everything one run needs, built from a validated `FitConfig`.

    In a process started by torchrun the trainer joins the job's process group (NCCL on GPUs,
    Gloo on CPUs), shards the data by rank and averages gradients across ranks; only rank 0
    writes files and prints.
    """

    def __init__(self, cfg: FitConfig) -> None:
        self.cfg = cfg
        self.env = dist_.current_env()
        env = self.env
        if cfg.nproc > 1 and not env.enabled:
            raise UserError(f"nproc={cfg.nproc} launches processes from the command line "
                            f"(localearn fit --nproc {cfg.nproc}); from Python, start the "
                            "script with torchrun instead")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        if env.enabled and cfg.nproc not in (1, local_world):
            raise UserError(f"--nproc {cfg.nproc} disagrees with the launcher, which started "
                            f"{local_world} processes on this node")
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
        cfg, env, device = self.cfg, self.env, self.device
        if cfg.precision == "16" and device.type == "cpu":
            self._check_cpu_fp16()
        if cfg.sync_bn and env.enabled and device.type != "cuda":
            raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm has no CPU kernel; "
                            "drop --sync-bn on CPU (BatchNorm statistics stay per rank)")
        seed_everything(cfg.seed)
        self.rule = expr.build(cfg.rule)
        self.data = load_data(cfg)
        info = self.data.info
        self.net = build_network(cfg.model, cfg.k, self.rule, info.num_classes,
                                 info.input_shape, cfg.split)
        self.aux = self.rule.setup(self.net, info)
        if cfg.sync_bn and env.enabled:
            self.net = dist_.convert_sync_batchnorm(self.net)
            self.aux = dist_.convert_sync_batchnorm(self.aux)
        memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.net.to(device, memory_format=memory_format)
        self.aux.to(device, memory_format=memory_format)
        if env.enabled:  # identical start on every rank, whatever the model's init does
            dist_.broadcast_module(self.net)
            dist_.broadcast_module(self.aux)
        seed_everything(cfg.seed + env.rank)  # ranks draw different numbers from here on
        params = [p for p in [*self.net.parameters(), *self.aux.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0,
                                         weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "16")
        self.reducer = dist_.GradReducer(params, env.world_size) if env.enabled else None
        for rule in rules_of(self.rule):
            rule.loss_scale = self.scaler.scale if self.scaler.is_enabled() else None
            rule.grads_ready = self.reducer.announce if self.reducer else None
        if cfg.compile:  # in place: state-dict names stay those of the plain modules
            for module in [*self.net.local_modules, *_callables(self.aux)]:
                module.compile()
        self._make_loaders()
        steps = len(self.train_loader)
        if steps == 0:
            raise UserError(f"no training batches: {len(self.data.train)} images for "
                            f"{env.world_size} process(es) of batch {cfg.batch_size}")
        self.steps_per_epoch = steps
        self.total_steps = steps * cfg.epochs
        warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else 0.05 * cfg.epochs
        self.warmup_steps = round(warm * steps)
        # the position of the run: `step` steps done, `batch_in_epoch` of them in `epoch`
        self.step = 0
        self.epoch = 1
        self.batch_in_epoch = 0
        self.epoch_done = False
        self.epoch_sums: list[float] = []
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.log = RunLog(cfg.output_dir, enabled=False)
        self._bar: tqdm | None = None
        self._resume_rng: dict[str, Any] | None = None

    @staticmethod
    def _check_cpu_fp16() -> None:
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                torch.ones(2, 2) @ torch.ones(2, 2)
        except RuntimeError as exc:
            raise UserError(f"--precision 16 is not supported on this CPU ({exc}); use "
                            "--precision bf16") from None

    def _make_loaders(self) -> None:
        cfg, env = self.cfg, self.env
        train, test = self.data.train, self.data.test
        pin = self.device.type == "cuda"
        self.train_sampler: ShardSampler | None = None
        if isinstance(train, IterableDataset):  # a stream shards and shuffles itself
            self.train_loader = make_loader(train, batch_size=cfg.batch_size, train=True,
                                            workers=cfg.workers, seed=cfg.seed, rank=env.rank,
                                            world_size=env.world_size)
        else:
            self.train_sampler = ShardSampler(len(train), shuffle=True, seed=cfg.seed,
                                              rank=env.rank, world_size=env.world_size)
            self.train_loader = DataLoader(
                SeededSamples(train, cfg.seed), batch_size=cfg.batch_size,
                sampler=self.train_sampler, num_workers=cfg.workers, pin_memory=pin,
                drop_last=len(train) > cfg.batch_size * env.world_size,
                generator=torch.Generator().manual_seed(cfg.seed))
        test_batch = max(256, cfg.batch_size)
        if isinstance(test, IterableDataset):
            self.test_loader = make_loader(test, batch_size=test_batch, train=False,
                                           workers=cfg.workers, rank=env.rank,
                                           world_size=env.world_size)
        else:
            sampler = ShardSampler(len(test), shuffle=False, rank=env.rank,
                                   world_size=env.world_size, pad=False)
            self.test_loader = DataLoader(test, batch_size=test_batch, sampler=sampler,
                                          num_workers=cfg.workers, pin_memory=pin)

    # ------------------------------------------------------------------------- training
    def set_lr(self) -> float:
        lr = warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.cfg.lr,
                           self.cfg.warmup_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """The epoch's batches, the first ``skip`` left out (resume)."""
        owners = [self.train_sampler, self.train_loader.dataset]
        for owner in owners:
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        if self.train_sampler is not None:
            self.train_sampler.skip = skip * self.cfg.batch_size
            try:
                yield from self.train_loader
            finally:
                self.train_sampler.skip = 0
        else:
            # loader workers seeded from (seed, epoch, rank), not from the global RNG, so a
            # deterministic stream augments the same way after a resume
            self.train_loader.generator = torch.Generator().manual_seed(
                sample_seed(self.cfg.seed, epoch, self.env.rank))
            it = iter(self.train_loader)
            for _ in range(skip):  # a stream cannot seek: read and drop
                next(it, None)
            if skip and self._resume_rng is not None:  # undo what reading consumed
                ckpt_io.set_rng_state(self._resume_rng)
            self._resume_rng = None
            yield from it

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (or its rest, after a resume); its summary row."""
        cfg, env, device = self.cfg, self.env, self.device
        self.net.train()
        self.aux.train()
        if epoch != self.epoch or self.epoch_done:
            self.epoch, self.batch_in_epoch, self.epoch_done = epoch, 0, False
            self.epoch_sums = []
        sums = self.epoch_sums
        step_times: list[float] = []
        images_done = 0
        lr = self.set_lr()
        start = last = time.perf_counter()
        for images, targets in self._batches(epoch, self.batch_in_epoch):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            lr = self.set_lr()
            self.optimizer.zero_grad(set_to_none=True)
            if self.reducer is not None:
                self.reducer.start()
            with autocast(device, cfg.precision):
                result = self.rule.train_step(self.net, images, targets)
            if self.reducer is not None:
                self.reducer.finish()
            n = len(targets)
            losses = [result.loss, *result.local_losses]
            correct = (result.logits.argmax(1) == targets).sum().item()
            bad = [v for v in losses if not math.isfinite(v)]
            # one small collective: global sums for the logs and a common NaN verdict
            totals = dist_.all_sum([result.loss * n, correct, n,
                                    *[v * n for v in result.local_losses], len(bad)],
                                   device, env)
            if totals[-1]:
                self._diverged(bad[0] if bad else float("nan"), epoch)
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.rule.after_step()
            self.step += 1
            self.batch_in_epoch += 1
            totals = totals[:-1]
            sums = [a + b for a, b in zip(sums, totals)] if sums else totals
            self.epoch_sums = sums
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            images_done += int(totals[2])
            self._after_batch(epoch, lr, totals, step_times[-1])
        seen = max(1.0, sums[2]) if sums else 1.0
        elapsed = time.perf_counter() - start
        return {"epoch": epoch, "step": self.step, "lr": lr,
                "train_loss": sums[0] / seen if sums else float("nan"),
                "train_acc": sums[1] / seen if sums else float("nan"),
                "local_losses": [s / seen for s in sums[3:]],
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
        if self.step % cfg.log_every == 0:
            self.log.step({"step": self.step, "epoch": epoch, "lr": lr,
                           "loss": totals[0] / n, "train_acc": totals[1] / n,
                           "local_losses": [v / n for v in totals[3:]],
                           "step_time": step_time, "images_per_s": totals[2] / step_time,
                           "peak_mem_mb": peak_memory_mb(self.device)})
        if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                and self.batch_in_epoch < self.steps_per_epoch):  # epoch ends save anyway
            self.save_checkpoint()

    def _diverged(self, value: float, epoch: int) -> None:
        last = self.last_checkpoint
        keep = (f"the last good checkpoint is {last} (resume it with --resume {last}, e.g. "
                f"with a lower --lr)" if last else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"the loss became {value} at step {self.step + 1} (epoch {epoch}); training "
            f"stopped before that step was applied and nothing was saved after it; {keep}; "
            f"the learning rate is {self.cfg.lr}")

    # ---------------------------------------------------------------------- checkpoints
    def _sync_buffers(self) -> None:
        if self.env.enabled:
            dist_.average_buffers(self.net, self.env.world_size)
            dist_.average_buffers(self.aux, self.env.world_size)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (without RNG states: see
        `save_checkpoint`)."""
        rule_state = getattr(self.rule, "state_dict", None)
        info = self.data.info
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "config": self.cfg.model_dump(mode="json"), "world_size": self.env.world_size,
            "num_classes": info.num_classes, "input_shape": list(info.input_shape),
            "model_k": self.net.k,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "epoch_done": self.epoch_done, "epoch_sums": list(self.epoch_sums),
            "history": list(self.history),
            "model": self.net.state_dict(), "aux": self.aux.state_dict(),
            "rule": rule_state() if callable(rule_state) else {},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": {"name": "warmup_cosine", "step": self.step,
                          "total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
        }

    def checkpoint(self, epoch: int | None = None) -> dict[str, Any]:
        """The checkpoint dict of the current state (kept for callers of the first engine)."""
        return {**self.state_dict(), "rng": [ckpt_io.rng_state()]}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N.pt`` atomically (rank 0) and prune old ones."""
        self._sync_buffers()
        rngs = dist_.gather_objects(ckpt_io.rng_state(), self.env)
        path = ckpt_io.step_path(self.cfg.output_dir, self.step)
        if self.env.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            atomic_save(state, path)
            ckpt_io.prune(self.cfg.output_dir, self.cfg.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def resume(self, spec: str) -> Path:
        """Load the checkpoint ``spec`` names (see `checkpoint.resolve`) and continue from it."""
        cfg, env = self.cfg, self.env
        found = ckpt_io.resolve(spec, cfg.output_dir) if env.is_main else None
        path, previous = dist_.broadcast_object(found, env)
        state = ckpt_io.read(path, previous)
        notes = ckpt_io.check_config(state, cfg.model_dump(mode="json"), path, env.world_size)
        ckpt_io.check_state(self.net, state["model"], "model", path)
        ckpt_io.check_state(self.aux, state["aux"], "auxiliary networks", path)
        own = [len(g["params"]) for g in self.optimizer.state_dict()["param_groups"]]
        saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if own != saved:
            raise UserError(f"checkpoint {path} does not fit this run's optimizer: parameter "
                            f"groups of sizes {saved}, this run has {own}; it was not loaded")
        # everything checked: now load
        self.net.load_state_dict(state["model"])
        self.aux.load_state_dict(state["aux"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        load_rule = getattr(self.rule, "load_state_dict", None)
        if callable(load_rule) and state.get("rule"):
            load_rule(state["rule"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.epoch_done = state["batch_in_epoch"], state["epoch_done"]
        self.epoch_sums = list(state.get("epoch_sums", []))
        self.history = list(state.get("history", []))
        rngs = state.get("rng") or []
        if len(rngs) == env.world_size:
            ckpt_io.set_rng_state(rngs[env.rank])
            self._resume_rng = rngs[env.rank]
        else:
            seed_everything(cfg.seed + env.rank + self.step)
        if self.epoch_done:  # the same unless the data layout changed at this boundary
            self.step = self.epoch * self.steps_per_epoch
        self.last_checkpoint = path
        if env.is_main:
            for note in notes:
                print(f"note: {note}", flush=True)
            where = ("end of epoch" if self.epoch_done
                     else f"batch {self.batch_in_epoch}/{self.steps_per_epoch} of epoch")
            print(f"resuming from {path}: step {state['step']}, {where} {self.epoch}",
                  flush=True)
        return path

    def _fresh_start(self) -> None:
        """A new run in ``output_dir``: refuse to bury an unfinished run's checkpoints, clear a
        finished run's."""
        out = self.cfg.output_dir
        unfinished = ckpt_io.unfinished(out) if self.env.is_main else None
        unfinished = dist_.broadcast_object(unfinished, self.env)
        if unfinished:
            raise UserError(f"{out} holds the checkpoints of an unfinished run ({unfinished}); "
                            "continue it with --resume, or delete "
                            f"{ckpt_io.checkpoint_dir(out)} or pick another --output-dir to "
                            "start over")
        if self.env.is_main:
            ckpt_io.prune(out, 0)

    def _finish(self) -> Path:
        """Keep the final state as ``RUN_DIR/checkpoint.pt``; drop the step checkpoints."""
        out = self.cfg.output_dir
        final = out / "checkpoint.pt"
        if self.env.is_main and self.last_checkpoint is not None \
                and self.last_checkpoint.is_file():
            for old in ckpt_io.list_checkpoints(out):
                if old != self.last_checkpoint:
                    old.unlink(missing_ok=True)
            os.replace(self.last_checkpoint, final)
        dist_.barrier(self.env)
        return final

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> FitResult:
        cfg, env = self.cfg, self.env
        out = cfg.output_dir
        try:
            if cfg.resume:
                self.resume(cfg.resume)
            else:
                self._fresh_start()
            self.log = RunLog(out, enabled=env.is_main, tensorboard=cfg.tensorboard)
            self.log.start(cfg.model_dump(mode="json"), self.history, self.step)
            first = self.epoch + 1 if self.epoch_done else self.epoch
            if env.is_main:
                procs = f", {env.world_size} processes" if env.enabled else ""
                print(f"training {self.rule.expression} on {cfg.model} (K={self.net.k}) with "
                      f"{cfg.dataset}: {len(self.data.train)} train / {len(self.data.test)} "
                      f"test images, device {self.device}{procs}, precision {cfg.precision}",
                      flush=True)
            self._bar = tqdm(total=self.total_steps, initial=min(self.step, self.total_steps),
                             leave=False, dynamic_ncols=True, unit="step",
                             disable=not (cfg.progress and env.is_main))
            for epoch in range(first, cfg.epochs + 1):
                row = self.train_epoch(epoch)
                dist_.check_replicas([*self.net.named_parameters(),
                                      *self.aux.named_parameters()], self.device, env)
                self._sync_buffers()
                row["test_acc"] = evaluate(self.net, self.test_loader, self.device,
                                           precision=cfg.precision,
                                           channels_last=cfg.channels_last, env=env)
                self.epoch_done = True
                self.history.append(row)
                self.log.epoch(row)
                if env.is_main:
                    self._bar.clear()
                    print(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                          f"train acc {row['train_acc']:.2%}  test acc {row['test_acc']:.2%}  "
                          f"({row['epoch_time']:.1f}s, {row['images_per_s']:.0f} img/s)",
                          flush=True)
                self.save_checkpoint()
            self._bar.close()
            if not self.history:
                raise UserError(f"nothing to report: no epoch finished in {out}")
            final = self._finish()
            if env.is_main:
                print(f"wrote {self.log.metrics_path} and {final}", flush=True)
            last = self.history[-1]
            return FitResult(last["test_acc"], last["train_loss"], self.history, self.step,
                             final)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.log.close()
            if self._owns_group:
                dist_.destroy_process_group()
                self._owns_group = False


def fit(cfg: FitConfig) -> FitResult:
    """Train one run end to end; see `Trainer`."""
    return Trainer(cfg).fit()
