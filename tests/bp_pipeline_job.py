"""A job for tests/test_bp_pipeline.py, run under torchrun: one step of pipelined BP on a fixed
synthetic batch per replica (``bp(schedule=S)`` for each schedule given, K=4, 2 stages), after
which every process saves the gradients, the parameters (stepped) and the buffers of its
stage's modules to ``OUT/grads-S-RANK.pt``.

Usage: ``bp_pipeline_job.py OUT MICROBATCHES SCHEDULE [SCHEDULE ...]``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from localearn import distributed as dist_
from localearn.build import build_run
from localearn.config import FitConfig
from localearn.interfaces import DataInfo

INFO = DataInfo(10, (3, 16, 16), (0.5,) * 3, (0.25,) * 3)
BATCH = 16


def batch(replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``replica`` (the same in the one-process reference)."""
    g = torch.Generator().manual_seed(100 + replica)
    return (torch.randn(BATCH, *INFO.input_shape, generator=g),
            torch.randint(0, INFO.num_classes, (BATCH,), generator=g))


def config(schedule: str, microbatches: int, stages: int) -> FitConfig:
    return FitConfig(rule=f"bp(schedule={schedule})", model="resnet32", k=4, device="cpu",
                     batch_size=BATCH, microbatches=microbatches, stages=stages,
                     stage_cuts="2" if stages > 1 else None, weight_decay=0.0,
                     output_dir=Path("."))


def main(out: Path, microbatches: int, schedules: list[str]) -> None:
    torch.set_num_threads(1)
    env = dist_.current_env()
    dist_.init_process_group(env, torch.device("cpu"))
    try:
        for schedule in schedules:
            cfg = config(schedule, microbatches, 2)
            run = build_run(cfg, info=INFO, device=torch.device("cpu"), env=env)
            run.net.train()
            strategy = run.strategy
            images, targets = batch(strategy.layout.replica)
            run.step(images, targets)
            mine = strategy.mine
            names = {n: p for n, p in run.net.named_parameters()
                     if any(n.startswith(f"local_modules.{i}.") for i in mine)}
            buffers = {n: b for n, b in run.net.named_buffers()
                       if any(n.startswith(f"local_modules.{i}.") for i in mine)}
            saved = {"grads": {n: p.grad.clone() for n, p in names.items()},
                     "params": {n: p.detach().clone() for n, p in names.items()},
                     "buffers": {n: b.clone() for n, b in buffers.items()},
                     "stage": strategy.layout.stage}
            run.step.drain()
            torch.save(saved, out / f"grads-{schedule}-{env.rank}.pt")
    finally:
        dist_.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
