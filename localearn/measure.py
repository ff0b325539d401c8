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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor, nn
from torch.autograd import DeviceType

from localearn import expr
from localearn.build import build_network, build_run, resolve_device
from localearn.config import FitConfig
from localearn.errors import UserError
from localearn.interfaces import DataInfo, UpdateRule
from localearn.runlog import peak_memory_bytes

T = TypeVar("T")


class RunSpec(BaseModel):
    """One configuration to measure: rule, model, K, batch and input size."""

    model_config = ConfigDict(extra="forbid")

    rule: str = "dgl"
    model: str = "resnet32"
    k: int | None = Field(None, ge=1, description="local modules (None: the rule's default)")
    split: str = "even"
    batch_size: int = Field(128, ge=1)
    input_size: int = Field(32, ge=4, description="height and width of the square input")
    num_classes: int = Field(10, ge=2)
    device: str = "auto"
    seed: int = 0
    precision: Literal["32", "bf16", "16"] = "32"
    channels_last: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device {v!r}; valid: auto, cpu, cuda, cuda:N")
        return v

    @property
    def info(self) -> DataInfo:
        return DataInfo(self.num_classes, (3, self.input_size, self.input_size),
                        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def label(self) -> str:
        return f"{self.rule} K={self.k}" if self.k is not None else self.rule


class MemoryResult(BaseModel):
    """The memory of one configuration; all sizes in bytes."""

    spec: RunSpec
    steps: int
    device: str
    param_bytes: dict[str, int] = Field(description="parameter bytes by role: backbone, heads, "
                                                    "copies, twins and any other aux role")
    buffer_bytes: dict[str, int] = Field(description="buffer bytes (batch-norm statistics...) "
                                                     "by the same roles")
    grad_bytes: int
    optimizer_bytes: int
    peak_bytes: int = Field(description="peak training memory of live tensors")
    peak_method: Literal["cuda.max_memory_allocated", "profiler memory events"]
    peak_rss_bytes: int = Field(description="the process's peak resident set size")
    rss_pass: bool = Field(True, description="on CPU, the RSS came from a separate pass "
                                             "without the profiler")
    rss_before_bytes: int = Field(description="peak resident set size before building the "
                                              "network (interpreter and libraries)")


class MemoryReport(BaseModel):
    """`localearn memory --json`: a rule, optionally its baseline, and the ratios."""

    rule: MemoryResult
    baseline: MemoryResult | None = None
    peak_ratio: float | None = Field(None, description="rule peak / baseline peak")
    rss_ratio: float | None = Field(None, description="rule peak RSS / baseline peak RSS")


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


# --------------------------------------------------------------------------- building a run


def make_spec(**values: object) -> RunSpec:
    """A `RunSpec` from keyword values; an invalid value is one `UserError` line."""
    try:
        return RunSpec.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"invalid {where}: {msg} (got {err.get('input')!r})") from None


def resolve(spec: RunSpec, fallback_k: bool = False) -> RunSpec:
    """Check a spec by building its rule and network; return it with the K actually trained.

    With ``fallback_k``, a K the rule refuses (a baseline such as end-to-end BP that fixes its
    own K) falls back to the rule's default K instead of failing."""
    resolve_device(spec.device)
    rule = expr.build(spec.rule)
    try:
        net = _network(spec, rule)
    except UserError:
        if not fallback_k or spec.k is None:
            raise
        spec = spec.model_copy(update={"k": None})
        net = _network(spec, rule)
    return spec.model_copy(update={"rule": rule.expression, "k": net.k})


def baseline_spec(spec: RunSpec, vs: str, vs_k: int | None = None) -> RunSpec:
    """The baseline ``vs`` on the same model, batch and input: K is ``vs_k`` if given, else
    the rule's K when the baseline accepts it, else the baseline's own default."""
    if vs_k is not None and vs_k < 1:
        raise UserError(f"invalid --vs-k: must be >= 1 (got {vs_k})")
    k = vs_k if vs_k is not None else spec.k
    return resolve(spec.model_copy(update={"rule": vs, "k": k}), fallback_k=vs_k is None)


def _network(spec: RunSpec, rule: UpdateRule) -> nn.Module:
    try:
        return build_network(spec.model, spec.k, rule, spec.num_classes,
                             (3, spec.input_size, spec.input_size), spec.split)
    except RuntimeError as exc:  # the dummy forward that traces shapes failed
        first = str(exc).splitlines()[0]
        raise UserError(f"model {spec.model!r} cannot run on {spec.input_size}x"
                        f"{spec.input_size} inputs ({first}); use a larger --input-size") \
            from None


class TrainingRun:
    """One rule on one model, built by `build_run` and trained by the engine's `TrainStep` on a
    fixed synthetic batch."""

    def __init__(self, spec: RunSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        cfg = FitConfig(rule=spec.rule, model=spec.model, k=spec.k, split=spec.split,
                        batch_size=spec.batch_size, seed=spec.seed, device=str(device),
                        precision=spec.precision, channels_last=spec.channels_last)
        run = build_run(cfg, info=spec.info, device=device)
        self.rule, self.net, self.aux = run.rule, run.net, run.aux
        self.params, self.optimizer, self._step = run.params, run.optimizer, run.step
        self.net.train()
        self.aux.train()
        shape = (spec.batch_size, 3, spec.input_size, spec.input_size)
        self.images = torch.randn(shape, device=device)
        if spec.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, spec.num_classes, (spec.batch_size,), device=device)

    def step(self) -> float:
        """One training step; returns the final classifier's loss."""
        totals = self._step(self.images, self.targets)
        return totals[0] / totals[2]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------- byte accounting


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def role_bytes(rule: UpdateRule, net: nn.Module, aux: nn.Module) -> tuple[dict[str, int],
                                                                          dict[str, int]]:
    """Parameter and buffer bytes by role: ``backbone`` (the split network), then the roles of
    ``rule.aux_groups(aux)``; a tensor shared by several roles counts once, in the first. Aux
    tensors that no group claims are reported as ``other`` so the totals stay complete."""
    params: dict[str, int] = {}
    buffers: dict[str, int] = {}
    seen: set[int] = set()

    def add(role: str, module: nn.Module) -> None:
        params.setdefault(role, 0)
        buffers.setdefault(role, 0)
        for store, tensors in ((params, module.parameters()), (buffers, module.buffers())):
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    store[role] += _nbytes(t)

    add("backbone", net)
    for role, module in rule.aux_groups(aux).items():
        add(role, module)
    leftover_p = sum(_nbytes(p) for p in aux.parameters() if id(p) not in seen)
    leftover_b = sum(_nbytes(b) for b in aux.buffers() if id(b) not in seen)
    if leftover_p or leftover_b:
        params["other"] = params.get("other", 0) + leftover_p
        buffers["other"] = buffers.get("other", 0) + leftover_b
    return params, buffers


def grad_bytes(params: list[nn.Parameter]) -> int:
    return sum(_nbytes(p.grad) for p in params if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_nbytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, Tensor))


def _peak_rss() -> int:
    return peak_memory_bytes(torch.device("cpu"))


#: glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def _return_freed_memory() -> Iterator[None]:
    """glibc only, while the block runs: serve blocks of 128 KiB and more with mmap, so freed
    tensors go back to the system at once. Under the profiler, its small allocations between
    freed tensors otherwise fragment the heap until the process's size is several times its
    live tensors (it reached 20 GB for MLAAN on ResNet-110 at batch 1024). The tensor peak does
    not depend on this. Afterwards the thresholds are those glibc's own adaptive rule reaches
    (mmap above 32 MiB, trim above 64 MiB): left at 128 KiB, every later tensor would be mapped
    and unmapped again, and training in this process ran 2.4 times slower."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        except (OSError, AttributeError):
            libc = None  # not glibc
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def replay_peak(events: list[tuple[int, int]]) -> int:
    """Peak of the running sum of signed allocation sizes ``(time_ns, bytes)``, in time order."""
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def cpu_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` and return its result and the peak of CPU tensor memory allocated while it
    ran (bytes live at the start do not count), from the profiler's allocation events: every
    allocation and free of PyTorch's CPU allocator, including operator workspaces."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, replay_peak(cpu_memory_events(prof))


def cpu_memory_source(prof: torch.profiler.profile) -> tuple[list[tuple[int, int]], str]:
    """``(time_ns, signed bytes)`` of every CPU allocation and free a finished
    ``profile(profile_memory=True)`` recorded, in time order, and where they came from:
    ``"kineto_results"`` (the profiler's raw results, a private attribute: every allocation)
    or, where a torch release moved that, ``"events"`` (the public ``prof.events()``: each
    op's own net allocation at its start, or its free at its end; op granularity, coarser)."""
    try:
        raw = prof.profiler.kineto_results.events()
        return sorted((e.start_ns(), e.nbytes()) for e in raw
                      if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), \
            "kineto_results"
    except (AttributeError, TypeError, RuntimeError):  # private API moved or changed
        pass
    events = []
    for e in prof.events():
        n = e.self_cpu_memory_usage
        if n:  # times in microseconds
            events.append((round(1000 * (e.time_range.start if n > 0 else e.time_range.end)), n))
    return sorted(events), "events"


def cpu_memory_events(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    """The events of `cpu_memory_source`, from whichever path this torch allows."""
    return cpu_memory_source(prof)[0]


# --------------------------------------------------------------------------- memory


def measure_memory_here(spec: RunSpec, steps: int = 2, rss_pass: bool = True) -> MemoryResult:
    """Measure one configuration in this process (`measure_memory` isolates it first).

    On CPU the run is done twice: first plainly, for the process's peak resident set (under
    the profiler the heap fragments and grows), then from scratch under the profiler, for the
    peak of live tensors. ``rss_pass=False`` skips the first pass: half the time, and the
    resident set then comes from the profiled pass."""
    device = resolve_device(spec.device)
    resolve(spec)  # load the plugins and libraries first: the resident set before the model
    rss_before = _peak_rss()  # then holds them, and its growth is the run's own

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
        peak_rss = _peak_rss()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda.max_memory_allocated"
    else:
        if rss_pass:
            del run
            gc.collect()
        # measured from before the network exists, so parameters and optimizer state count too
        with _return_freed_memory():
            run, peak = cpu_peak(train)
        method = "profiler memory events"
        if not rss_pass:
            peak_rss = _peak_rss()
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


# --------------------------------------------------------------------------- speed and FLOPs


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


# --------------------------------------------------------------------------- tables


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def format_memory(report: MemoryReport) -> str:
    results = [report.rule] + ([report.baseline] if report.baseline else [])
    r0 = results[0]
    roles = list(dict.fromkeys(role for r in results for role in r.param_bytes))
    rows: list[tuple[str, list[int]]] = [
        (f"params: {role}", [r.param_bytes.get(role, 0) for r in results]) for role in roles]
    rows += [
        ("buffers", [sum(r.buffer_bytes.values()) for r in results]),
        ("gradients", [r.grad_bytes for r in results]),
        ("optimizer state", [r.optimizer_bytes for r in results]),
        ("peak training memory", [r.peak_bytes for r in results]),
        ("peak RSS (process)" if all(r.rss_pass for r in results)
         else "peak RSS (+ profiler)", [r.peak_rss_bytes for r in results]),
        ("RSS before the model", [r.rss_before_bytes for r in results]),
    ]
    header = [""] + [r.spec.label() for r in results] + (["ratio"] if len(results) > 1 else [])
    body = [[name] + [human_bytes(v) for v in vals]
            + ([_ratio(vals[0], vals[1])] if len(vals) > 1 else []) for name, vals in rows]
    s = r0.spec
    title = (f"memory: {s.model}, batch {s.batch_size}, 3x{s.input_size}x{s.input_size}, "
             f"{r0.device}, {r0.steps} training steps; peak from {r0.peak_method}")
    return title + "\n" + _table(header, body)


def format_bench(report: BenchReport) -> str:
    results = [report.rule] + ([report.baseline] if report.baseline else [])
    rows: list[tuple[str, list[float], str]] = [
        ("median step time (s)", [r.median_step_s for r in results], "{:.4f}"),
        ("images/s", [r.images_per_s for r in results], "{:.1f}"),
        ("GFLOPs/image", [r.flops_per_image / 1e9 for r in results], "{:.4f}"),
        ("achieved GFLOP/s", [r.achieved_flops_per_s / 1e9 for r in results], "{:.2f}"),
    ]
    header = [""] + [r.spec.label() for r in results] + (["ratio"] if len(results) > 1 else [])
    body = [[name] + [fmt.format(v) for v in vals]
            + ([_ratio(vals[0], vals[1])] if len(vals) > 1 else []) for name, vals, fmt in rows]
    s = report.rule.spec
    title = (f"bench: {s.model}, batch {s.batch_size}, 3x{s.input_size}x{s.input_size}, "
             f"{report.rule.device}, {torch.get_num_threads()} threads; median of "
             f"{report.steps} interleaved steps after {report.warmup} warm-up steps")
    return title + "\n" + _table(header, body)


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
