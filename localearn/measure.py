"""Measure what local learning is for (memory) and what it costs (time and FLOPs).

Both measurements run real training steps of a run built by `localearn.build.build_run`, the
very function `fit` builds with (rule, network, auxiliary networks, SGD with the `FitConfig`
defaults, precision and memory format), each step being the engine's own `TrainStep`. Inputs
are synthetic random batches of the requested size: memory and time do not depend on the pixel
values.

`measure_memory` runs each configuration in a fresh Python process, so its peak cannot include
memory a previous configuration left behind (freed CPU memory often stays in the process, and
allocator caches and caches of convolution primitives outlive a model). The peak is:

- on CUDA, ``torch.cuda.max_memory_allocated`` around the steps (everything live counts:
  parameters, buffers, gradients, optimizer state, activations, workspaces);
- on CPU, the peak of live tensor memory replayed from the PyTorch profiler's memory events:
  every allocation and free of PyTorch's CPU allocator, signed, in time order, from before the
  network is built to the end of the last step. Convolution workspaces from oneDNN go through
  that allocator too, so they are counted. The process's peak resident set size is reported
  beside it as a cross-check; it also holds the interpreter, the libraries and freed memory the
  C allocator kept, so it is always larger. It comes from a first, unprofiled pass of the same
  steps (under the profiler the heap fragments and grows); the profiled pass builds the run
  again from scratch.

`bench` times a rule against a baseline in one process, interleaved (A B A B ...) after a
warm-up, and reports medians; it also counts FLOPs per image with
`torch.utils.flop_counter.FlopCounterMode` (matrix multiplications and convolutions, forward
and backward; element-wise work such as batch norm is not counted) and divides them by the
median step time, so a rule that is slow can be told apart from a rule that computes more.

This module owns the memory measurement (fresh processes, the worker) and is the public face of
the rest, re-exported here: `localearn.measure_run` (`RunSpec`, `TrainingRun`),
`localearn.measure_bytes` (the memory figures and how each is counted),
`localearn.measure_speed` (`bench`) and `localearn.measure_tables` (the text tables).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from localearn.build import resolve_device
from localearn.errors import UserError
from localearn.measure_bytes import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MemoryReport,
    MemoryResult,
    cpu_memory_events,
    cpu_memory_source,
    cpu_peak,
    grad_bytes,
    optimizer_bytes,
    process_peak_rss,
    replay_peak,
    return_freed_memory,
    role_bytes,
)
from localearn.measure_run import RunSpec, TrainingRun, baseline_spec, make_spec, resolve
from localearn.measure_speed import BenchReport, BenchResult, bench, count_flops
from localearn.measure_tables import format_bench, format_memory, human_bytes

__all__ = [
    "M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "BenchReport", "BenchResult", "MemoryReport",
    "MemoryResult", "RunSpec", "TrainingRun", "baseline_spec", "bench", "count_flops",
    "cpu_memory_events", "cpu_memory_source", "cpu_peak", "format_bench", "format_memory",
    "grad_bytes", "human_bytes", "make_spec", "measure_memory", "measure_memory_here",
    "memory_report", "optimizer_bytes", "replay_peak", "resolve", "role_bytes",
]


def measure_memory_here(spec: RunSpec, steps: int = 2, rss_pass: bool = True) -> MemoryResult:
    """Measure one configuration in this process (`measure_memory` isolates it first).

    On CPU the run is done twice: first plainly, for the process's peak resident set (under
    the profiler the heap fragments and grows), then from scratch under the profiler, for the
    peak of live tensors. ``rss_pass=False`` skips the first pass: half the time, and the
    resident set then comes from the profiled pass."""
    device = resolve_device(spec.device)
    resolve(spec)  # load the plugins and libraries first: the resident set before the model
    rss_before = process_peak_rss()  # then holds them, and its growth is the run's own

    def train() -> TrainingRun:
        run = TrainingRun(spec, device)
        if device.type == "cuda":
            run.sync()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            run.step()
        run.sync()
        return run

    cuda = device.type == "cuda"
    if cuda or rss_pass:
        run = train()
        peak_rss = process_peak_rss()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda.max_memory_allocated"
    else:
        if rss_pass:
            del run
            gc.collect()
        # measured from before the network exists, so parameters and optimizer state count too
        with return_freed_memory():
            run, peak = cpu_peak(train)
        method = "profiler memory events"
        if not rss_pass:
            peak_rss = process_peak_rss()
    params, buffers = role_bytes(run.rule, run.net, run.aux)
    return MemoryResult(
        spec=spec, steps=steps, device=str(device), param_bytes=params, buffer_bytes=buffers,
        grad_bytes=grad_bytes(run.params), optimizer_bytes=optimizer_bytes(run.optimizer),
        peak_bytes=peak, peak_method=method, peak_rss_bytes=peak_rss,
        rss_pass=cuda or rss_pass, rss_before_bytes=rss_before)


def measure_memory(spec: RunSpec, steps: int = 2, rss_pass: bool = True) -> MemoryResult:
    """Measure one configuration in a fresh Python process (see the module docs and
    `measure_memory_here`)."""
    with tempfile.TemporaryDirectory(prefix="localearn-memory-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "localearn.measure", "--worker", spec.model_dump_json(),
               str(steps), str(out)] + ([] if rss_pass else ["--no-rss-pass"])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 2:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("localearn: error:")]
            if lines:
                raise UserError(lines[-1].removeprefix("localearn: error: "))
        if proc.returncode < 0:
            raise UserError(f"measuring {spec.label()} at batch {spec.batch_size}: the process "
                            f"was killed by signal {-proc.returncode} (out of memory?); try a "
                            "smaller --batch-size")
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.splitlines()[-20:])
            raise RuntimeError(f"memory worker for {spec.label()} failed "
                               f"(exit {proc.returncode}):\n{tail}")
        return MemoryResult.model_validate_json(out.read_text())


def memory_report(spec: RunSpec, vs: str | None = None, vs_k: int | None = None,
                  steps: int = 2, rss_pass: bool = True,
                  progress: Callable[[str], None] | None = None) -> MemoryReport:
    """Memory of ``spec`` and, with ``vs``, of that baseline rule on the same model and batch;
    each in its own fresh process."""
    spec = resolve(spec)
    base = baseline_spec(spec, vs, vs_k) if vs else None
    results = []
    for s in [spec] + ([base] if base else []):
        if progress:
            progress(f"measuring {s.label()} on {s.model}, batch {s.batch_size}, "
                     f"{s.input_size}x{s.input_size}, in a fresh process")
        results.append(measure_memory(s, steps, rss_pass))
    report = MemoryReport(rule=results[0])
    if base:
        b = results[1]
        report.baseline = b
        report.peak_ratio = results[0].peak_bytes / b.peak_bytes if b.peak_bytes else None
        report.rss_ratio = results[0].peak_rss_bytes / b.peak_rss_bytes
    return report


# --------------------------------------------------------------------------- worker process


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="localearn.measure")
    parser.add_argument("--worker", required=True, help="RunSpec as JSON")
    parser.add_argument("steps", type=int)
    parser.add_argument("--no-rss-pass", dest="rss_pass", action="store_false")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        result = measure_memory_here(RunSpec.model_validate_json(args.worker), args.steps,
                                     args.rss_pass)
    except UserError as exc:
        print(f"localearn: error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(result.model_dump(mode="json")))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1:]))
