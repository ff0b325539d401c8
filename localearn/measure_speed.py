"""What a rule costs in time and FLOPs: `bench` and its `BenchReport` (the method is in
`localearn.measure`'s docs): interleaved medians of step time, and FLOPs per image from
`FlopCounterMode` over the median step time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from localearn.build import resolve_device
from localearn.errors import UserError
from localearn.measure_run import RunSpec, TrainingRun, baseline_spec, resolve


class BenchResult(BaseModel):
    spec: RunSpec
    device: str
    step_times_s: list[float]
    median_step_s: float
    images_per_s: float
    flops_per_image: float = Field(description="matmul and convolution FLOPs of one training "
                                               "step (forward and backward), per image")
    achieved_flops_per_s: float


class BenchReport(BaseModel):
    """`localearn bench --json`: a rule against a baseline, timed interleaved in one process."""

    warmup: int
    steps: int
    rule: BenchResult
    baseline: BenchResult | None = None
    time_ratio: float | None = Field(None, description="rule median step / baseline median step")
    throughput_ratio: float | None = Field(None, description="rule images/s / baseline images/s")
    flops_ratio: float | None = Field(None, description="rule FLOPs/image / baseline FLOPs/image")
    achieved_flops_ratio: float | None = Field(
        None, description="rule achieved FLOP/s / baseline achieved FLOP/s")


def count_flops(run: TrainingRun) -> int:
    """FLOPs of one training step (forward and every backward), counted by FlopCounterMode;
    the step is real (the optimizer steps), so it also serves as a warm-up step."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run.step()
    return int(counter.get_total_flops())


def _timed_step(run: TrainingRun) -> float:
    run.sync()
    start = time.perf_counter()
    run.step()
    run.sync()
    return time.perf_counter() - start


def bench(spec: RunSpec, vs: str | None = "bp", vs_k: int | None = None, warmup: int = 2,
          steps: int = 10, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Step time, images/s, FLOPs/image and achieved FLOP/s of ``spec`` and of the baseline rule
    ``vs``, both in this process, timed interleaved after ``warmup`` steps each."""
    if steps < 1:
        raise UserError(f"invalid --steps: must be >= 1 (got {steps})")
    if warmup < 0:
        raise UserError(f"invalid --warmup: must be >= 0 (got {warmup})")
    spec = resolve(spec)
    specs = [spec] + ([baseline_spec(spec, vs, vs_k)] if vs else [])
    device = resolve_device(spec.device)
    runs = [TrainingRun(s, device) for s in specs]
    if progress:
        progress("counting FLOPs: " + ", ".join(s.label() for s in specs))
    flops = [count_flops(r) for r in runs]
    if progress:
        progress(f"warming up ({warmup} steps each), then timing {steps} interleaved steps")
    for _ in range(warmup):
        for r in runs:
            r.step()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(steps):
        for i, r in enumerate(runs):
            times[i].append(_timed_step(r))
    results = []
    for r, f, t in zip(runs, flops, times):
        median = statistics.median(t)
        results.append(BenchResult(
            spec=r.spec, device=str(device), step_times_s=t, median_step_s=median,
            images_per_s=r.spec.batch_size / median, flops_per_image=f / r.spec.batch_size,
            achieved_flops_per_s=f / median))
    report = BenchReport(warmup=warmup, steps=steps, rule=results[0])
    if vs:
        a, b = results
        report.baseline = b
        report.time_ratio = a.median_step_s / b.median_step_s
        report.throughput_ratio = a.images_per_s / b.images_per_s
        report.flops_ratio = a.flops_per_image / b.flops_per_image if b.flops_per_image else None
        report.achieved_flops_ratio = (a.achieved_flops_per_s / b.achieved_flops_per_s
                                       if b.achieved_flops_per_s else None)
    return report
