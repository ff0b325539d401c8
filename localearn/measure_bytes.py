"""Memory figures: the `MemoryResult` / `MemoryReport` schema and how each figure is counted
(tensor bytes by role, gradients, optimizer state, and the peak of live CPU tensors replayed
from the profiler's memory events). `localearn.measure` runs the measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torch.autograd import DeviceType

from localearn.interfaces import UpdateRule
from localearn.measure_run import RunSpec
from localearn.runlog import peak_memory_bytes

T = TypeVar("T")


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


# --------------------------------------------------------------------------- peaks


def process_peak_rss() -> int:
    """The process's peak resident set size so far, in bytes."""
    return peak_memory_bytes(torch.device("cpu"))


#: glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def return_freed_memory() -> Iterator[None]:
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
