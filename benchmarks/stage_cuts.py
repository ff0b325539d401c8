"""How often the automatic stage cut changes from run to run: the old planner (each module timed
on its own, median of 3 after a warm-up, then `balance`) against the interleaved rounds of
`localearn.engine.stage_costs`, called alternately (old, new, old, ...) so both see the same
machine load. A benchmark, not a test: its figures depend on the machine.

    python benchmarks/stage_cuts.py [--runs 10] [--rule dgl] [--model resnet32] [--k 16]
        [--batch-size 128] [--stages 2] [--threads 1] [--rounds 5]

Rule and network are built as `localearn bench --stages` builds each stage process's (synthetic
32x32 inputs, CPU, one thread as each stage process has); the planner gets them as
`stages.plan_cuts` does, with the batch capped at 128.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from localearn.build import build_run
from localearn.config import FitConfig
from localearn.engine.stage_costs import measured_cuts
from localearn.engine.stages import balance, module_costs
from localearn.interfaces import DataInfo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="calls of each planner")
    parser.add_argument("--rule", default="dgl")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="the new planner's rounds "
                        "(default: its own)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = FitConfig(rule=args.rule, model=args.model, k=args.k, batch_size=args.batch_size,
                    device="cpu", output_dir=Path("."))
    info = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    run = build_run(cfg, info=info, device=torch.device("cpu"))
    batch = min(args.batch_size, 128)
    extra = {} if args.rounds is None else {"rounds": args.rounds}
    planners = {
        "old": lambda: balance(module_costs(run.rule, run.net, batch), args.stages),
        "new": lambda: measured_cuts(run.rule, run.net, args.stages, batch, **extra),
    }
    chosen: dict[str, list[tuple[int, ...]]] = {name: [] for name in planners}
    spent: dict[str, float] = dict.fromkeys(planners, 0.0)
    print(f"{args.rule} on {args.model} (K={args.k}), batch {batch}, {args.stages} stages, "
          f"{args.threads} thread(s), {args.runs} runs of each planner")
    for i in range(args.runs):
        for name, plan in planners.items():
            start = time.perf_counter()
            cut = tuple(plan())
            took = time.perf_counter() - start
            spent[name] += took
            chosen[name].append(cut)
            print(f"  run {i + 1:2d} {name}: cut {','.join(map(str, cut))} ({took:.1f} s)",
                  flush=True)
    for name, cuts in chosen.items():
        counts = ", ".join(f"{','.join(map(str, c))}: {n}" for c, n in
                           sorted(Counter(cuts).items()))
        print(f"{name}: {counts} (mean {spent[name] / args.runs:.1f} s a call)")


if __name__ == "__main__":
    main()
