"""What keeping freed CPU memory buys (`localearn.cpu_memory`): each rule's step time, page
faults and peak resident memory in fresh processes with ``LOCALEARN_MALLOC=system`` (glibc's
own settings) and ``keep`` (the default), run alternately (system, keep, system, ...) so both
see the same machine load. A benchmark, not a test: its figures depend on the machine.

    python benchmarks/cpu_memory.py [--rule dgl --rule bp ...] [--model resnet32] [--k 16]
        [--batch-size 128] [--steps 10] [--repeats 3]

Every process builds the run as `localearn bench` does (synthetic 32x32 inputs, CPU, one
thread), trains 2 untimed steps and ``--steps`` timed ones, and reports the median step, the
minor page faults of the timed steps and the process's peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = """
import json, resource, sys, time, torch
from localearn import cpu_memory
from localearn.measure_run import RunSpec, TrainingRun, resolve
rule, model, k, batch, steps = json.loads(sys.argv[1])
torch.set_num_threads(1)
run = TrainingRun(resolve(RunSpec(rule=rule, model=model, k=k, batch_size=batch,
                                  device="cpu")), torch.device("cpu"))
for _ in range(2):
    run.step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range(steps):
    start = time.perf_counter()
    run.step()
    times.append(time.perf_counter() - start)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps([cpu_memory._applied, times, faults, rss]))
"""


def measure(rule: str, malloc: str, args: argparse.Namespace) -> tuple[float, float, int]:
    """Median step (s), page faults per step and peak RSS (bytes) of one fresh process."""
    env = dict(os.environ, LOCALEARN_MALLOC=malloc, OMP_NUM_THREADS="1")
    k = None if rule.split("(")[0] == "bp" else args.k
    spec = json.dumps([rule, args.model, k, args.batch_size, args.steps])
    done = subprocess.run([sys.executable, "-c", WORKER, spec], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"{rule} ({malloc}) failed: {done.stderr.strip().splitlines()[-1:]}")
    applied, times, faults, rss = json.loads(done.stdout.splitlines()[-1])
    if applied != (malloc == "keep"):
        sys.exit(f"LOCALEARN_MALLOC={malloc} was not in force (applied: {applied})")
    return statistics.median(times), faults / args.steps, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", action="append", help="repeat for several (default: dgl, bp)")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--k", type=int, default=16, help="K of the local rules (bp: 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting")
    args = parser.parse_args()
    print(f"{args.model}, batch {args.batch_size}, 1 thread; median step of {args.steps} after "
          f"2 untimed; {args.repeats} fresh processes per setting, alternated")
    print(f"  {'rule':<16} {'setting':<7} {'step (s), each process':<24} {'faults/step':>12} "
          f"{'peak RSS (MiB)':>15}")
    for rule in args.rule or ["dgl", "bp"]:
        runs: dict[str, list[tuple[float, float, int]]] = {"system": [], "keep": []}
        for _ in range(args.repeats):
            for malloc in runs:
                runs[malloc].append(measure(rule, malloc, args))
        for malloc, rows in runs.items():
            steps = ", ".join(f"{r[0]:.3f}" for r in rows)
            faults = statistics.median(r[1] for r in rows)
            rss = statistics.median(r[2] for r in rows) / 2**20
            print(f"  {rule:<16} {malloc:<7} {steps:<24} {faults:>12,.0f} {rss:>15,.0f}")
        ratio = (statistics.median(r[0] for r in runs["keep"])
                 / statistics.median(r[0] for r in runs["system"]))
        print(f"  {rule:<16} keep / system, median step: {ratio:.3f}")


if __name__ == "__main__":
    main()
