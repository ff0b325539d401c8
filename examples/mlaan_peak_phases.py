"""Where in an MLAAN step the CPU peak of live tensors falls: one profiled step with every
head backward, LAM forward and module backward labelled, then the live bytes at each phase.

    python examples/mlaan_peak_phases.py "mlaan(dgl)" resnet32 16 256
    python examples/mlaan_peak_phases.py "mlaan(dgl, recompute=true)" resnet32 16 256

The exact timeline of allocations and frees comes from the profiler's raw Kineto results,
which torch reaches only through a private attribute (``prof.profiler.kineto_results``). When
a torch release changes that, `timeline` falls back to the public ``prof.events()``: each op's
own net allocation, placed at its start (allocations) or end (frees), which is coarser (op
granularity) but finds the same phase for a peak that one op makes. It says which it used;
tests/test_tooling.py fails when the private path stops working.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from localearn.build import build_run
from localearn.config import make_config
from localearn.interfaces import DataInfo

PHASE = "phase: "
Events = list[tuple[float, int]]  # (time, signed bytes), in time order
Spans = list[tuple[float, float, str]]  # (start, end, label) of each labelled phase


def kineto_timeline(prof: profile) -> tuple[Events, Spans]:
    """Every CPU allocation and free, and the labelled phases, in nanoseconds, from the raw
    Kineto results (a private attribute of torch's profiler)."""
    from torch.autograd import DeviceType

    raw = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in raw
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    phases = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in raw
                    if e.name().startswith(PHASE))
    return memory, phases


def events_timeline(prof: profile) -> tuple[Events, Spans]:
    """The same from the public ``prof.events()``, in microseconds: each event's own net CPU
    allocation at its start when positive, at its end when negative (frees)."""
    memory, phases = [], []
    for e in prof.events():
        n = e.self_cpu_memory_usage
        if n:
            memory.append((e.time_range.start if n > 0 else e.time_range.end, n))
        if e.name.startswith(PHASE):
            phases.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(memory), sorted(phases)


def timeline(prof: profile) -> tuple[Events, Spans, str]:
    """`kineto_timeline` where this torch still allows it, else `events_timeline`; and
    which of the two (``"kineto_results"`` or ``"events"``) was used."""
    try:
        memory, phases = kineto_timeline(prof)
        return memory, phases, "kineto_results"
    except (AttributeError, TypeError, RuntimeError):  # private API moved or changed
        memory, phases = events_timeline(prof)
        return memory, phases, "events"


def peak_phase(memory: Events, phases: Spans) -> tuple[int, list[str]]:
    """The peak of live bytes (above the start) and the labelled phases it falls in."""
    live = peak = 0
    at_peak = 0.0
    for t, n in memory:
        live += n
        if live > peak:
            peak, at_peak = live, t
    return peak, [name for start, end, name in phases if start <= at_peak <= end]


def labelled(fn: Callable, label: Callable[..., str]) -> Callable:
    def run(*args, **kwargs):
        with record_function(PHASE + label(*args)):
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
    memory, phases, source = timeline(prof)
    peak, inside = peak_phase(memory, phases)
    print(f"{args.rule}, {args.model} K={args.k}, batch {args.batch}: peak {peak / 2**20:.1f} "
          f"MiB above the start of the step, during {inside or 'no labelled phase'} "
          f"(profiler {source})")
    live, i, start_live = 0, 0, {}
    for start, _, name in phases:
        while i < len(memory) and memory[i][0] <= start:
            live += memory[i][1]
            i += 1
        start_live[name] = max(start_live.get(name, 0), live)
    for name, nbytes in sorted(start_live.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {nbytes / 2**20:8.1f} MiB live as '{name[len(PHASE):]}' starts")


if __name__ == "__main__":
    main()
