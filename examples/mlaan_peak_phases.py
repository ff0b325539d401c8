"""Where in an MLAAN step the CPU peak of live tensors falls: one profiled step with every
head backward, LAM forward and module backward labelled, then the live bytes at each phase.

    python examples/mlaan_peak_phases.py "mlaan(dgl)" resnet32 16 256
    python examples/mlaan_peak_phases.py "mlaan(dgl, recompute=true)" resnet32 16 256
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from localearn.build import build_run
from localearn.config import make_config
from localearn.interfaces import DataInfo
from localearn.measure import cpu_memory_events


def labelled(fn: Callable, label: Callable[..., str]) -> Callable:
    def run(*args, **kwargs):
        with record_function("phase: " + label(*args)):
            return fn(*args, **kwargs)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rule")
    p.add_argument("model")
    p.add_argument("k", type=int)
    p.add_argument("batch", type=int)
    args = p.parse_args()
    info = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    run = build_run(make_config(rule=args.rule, model=args.model, k=args.k, device="cpu"),
                    info=info)
    rule = run.rule
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    rule._head_grad = labelled(rule._head_grad, lambda name, *_: f"head backward, {name}")
    rule._backward_module = labelled(rule._backward_module,
                                     lambda _net, name, j, *_: f"{name} through module {j}")
    rule.lam_forward = labelled(rule.lam_forward, lambda i, _z: f"LAM {i} forward")

    def step() -> None:  # the engine's step: zero_grad, train_step, optimizer step, EMA
        run.step(x, y)

    step()  # optimizer state exists before the profiled step, as in every later step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    memory = cpu_memory_events(prof)
    phases = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
                    for e in prof.profiler.kineto_results.events()
                    if e.name().startswith("phase: "))
    live = peak = 0
    at_peak = 0
    for t, n in memory:
        live += n
        if live > peak:
            peak, at_peak = live, t
    inside = [name for start, end, name in phases if start <= at_peak <= end]
    print(f"{args.rule}, {args.model} K={args.k}, batch {args.batch}: peak {peak / 2**20:.1f} "
          f"MiB above the start of the step, during {inside or 'no labelled phase'}")
    live, i, start_live = 0, 0, {}
    for start, _, name in phases:
        while i < len(memory) and memory[i][0] <= start:
            live += memory[i][1]
            i += 1
        start_live[name] = max(start_live.get(name, 0), live)
    for name, nbytes in sorted(start_live.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {nbytes / 2**20:8.1f} MiB live as '{name[7:]}' starts")


if __name__ == "__main__":
    main()
