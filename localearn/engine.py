"""The engine: builds the run from a `FitConfig` through the registry and trains any rule.

Per batch: ``rule.train_step`` (all forward and backward passes of the rule), one optimizer step
over backbone and auxiliary parameters, ``rule.after_step``. Evaluation uses the backbone's own
classifier only; auxiliary networks are training-only.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from localearn import expr, registry
from localearn.config import FitConfig
from localearn.data import DataSplits, make_loader
from localearn.errors import UserError
from localearn.interfaces import LocalModuleSplitter, SplitNetwork, UpdateRule


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


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file, fsync it, then rename over ``path``."""
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


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy of the backbone's own classifier."""
    was_training = net.training
    net.eval()
    correct = total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        correct += (net(images).argmax(1) == targets).sum().item()
        total += len(targets)
    net.train(was_training)
    return correct / max(1, total)


@dataclass
class FitResult:
    test_acc: float
    train_loss: float
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Everything one run needs, built from a validated `FitConfig`."""

    def __init__(self, cfg: FitConfig) -> None:
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.rule = expr.build(cfg.rule)
        self.data = load_data(cfg)
        info = self.data.info
        self.net = build_network(cfg.model, cfg.k, self.rule, info.num_classes,
                                 info.input_shape, cfg.split).to(self.device)
        self.aux = self.rule.setup(self.net, info).to(self.device)
        params = [p for p in [*self.net.parameters(), *self.aux.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0,
                                         weight_decay=cfg.weight_decay)
        self.train_loader = make_loader(self.data.train, batch_size=cfg.batch_size, train=True,
                                        workers=cfg.workers, seed=cfg.seed)
        self.test_loader = make_loader(self.data.test, batch_size=max(256, cfg.batch_size),
                                       train=False, workers=cfg.workers)
        steps = len(self.train_loader)
        self.total_steps = steps * cfg.epochs
        warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else 0.05 * cfg.epochs
        self.warmup_steps = round(warm * steps)
        self.step = 0

    def set_lr(self) -> float:
        lr = warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.cfg.lr,
                           self.cfg.warmup_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int) -> dict:
        self.net.train()
        self.aux.train()
        loss_sum = correct = seen = 0.0
        local_sum: list[float] = []
        start = time.perf_counter()
        for owner in (self.train_loader.sampler, self.data.train):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress, dynamic_ncols=True)
        for images, targets in bar:
            images, targets = images.to(self.device), targets.to(self.device)
            lr = self.set_lr()
            self.optimizer.zero_grad(set_to_none=True)
            result = self.rule.train_step(self.net, images, targets)
            if not math.isfinite(result.loss):
                raise UserError(f"the loss became {result.loss} at step {self.step}; lower --lr "
                                f"(now {self.cfg.lr})")
            self.optimizer.step()
            self.rule.after_step()
            self.step += 1
            n = len(targets)
            loss_sum += result.loss * n
            correct += (result.logits.argmax(1) == targets).sum().item()
            seen += n
            if not local_sum:
                local_sum = [0.0] * len(result.local_losses)
            local_sum = [a + b * n for a, b in zip(local_sum, result.local_losses)]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}")
        return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / max(1, seen),
                "train_acc": correct / max(1, seen),
                "local_losses": [s / max(1, seen) for s in local_sum],
                "epoch_time": time.perf_counter() - start}

    def checkpoint(self, epoch: int) -> dict:
        return {"config": self.cfg.model_dump(mode="json"), "epoch": epoch, "step": self.step,
                "model": self.net.state_dict(), "aux": self.aux.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def fit(self) -> FitResult:
        out = self.cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        metrics_path.write_text("")
        history: list[dict] = []
        print(f"training {self.rule.expression} on {self.cfg.model} (K={self.net.k}) with "
              f"{self.cfg.dataset}: {len(self.data.train)} train / {len(self.data.test)} test "
              f"images, device {self.device}", flush=True)
        for epoch in range(1, self.cfg.epochs + 1):
            row = self.train_epoch(epoch)
            row["test_acc"] = evaluate(self.net, self.test_loader, self.device)
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"epoch {epoch}/{self.cfg.epochs}  train loss {row['train_loss']:.4f}  "
                  f"train acc {row['train_acc']:.2%}  test acc {row['test_acc']:.2%}  "
                  f"({row['epoch_time']:.1f}s)", flush=True)
        atomic_save(self.checkpoint(self.cfg.epochs), out / "checkpoint.pt")
        print(f"wrote {metrics_path} and {out / 'checkpoint.pt'}", flush=True)
        return FitResult(history[-1]["test_acc"], history[-1]["train_loss"], history)


def fit(cfg: FitConfig) -> FitResult:
    """Train one run end to end; see `Trainer`."""
    return Trainer(cfg).fit()
