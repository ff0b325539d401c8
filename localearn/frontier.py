"""The memory-time frontier: several rules on one setting, each placed by its peak training
memory and its step time, both as a ratio to end-to-end BP measured in the same call.

Nothing here measures on its own: memory comes from `localearn.measure.measure_memory` (each
rule in a fresh process, as ``localearn memory``) and time from `localearn.measure.bench` (each
rule timed interleaved with BP in one process, as ``localearn bench``). `measure_frontier`
gathers them, `format_frontier` prints the table and `plot_frontier` draws the plane.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from localearn.errors import UserError
from localearn.measure import (
    BenchResult,
    MemoryResult,
    RunSpec,
    bench,
    measure_memory,
    resolve,
)
from localearn.measure_tables import _table

#: the rules ``localearn frontier`` measures when none are given (the CLI keeps a copy so that
#: ``--help`` does not import torch; a test checks that the two agree)
DEFAULT_RULES = ("bp", "bp(checkpoint=sqrt)", "dgl", "infopro", "auglocal", "man(dgl)",
                 "hpff(dgl)", "mlaan(dgl)", "mlaan(dgl, recompute=true)")
#: the baseline every ratio is taken against
BASELINE = "bp"


class FrontierPoint(BaseModel):
    """One rule on the plane; sizes in bytes, times in seconds."""

    rule: str
    k: int
    peak_bytes: int = Field(description="peak training memory (as localearn memory)")
    memory_ratio: float = Field(description="peak_bytes / BP's peak_bytes")
    step_time_s: float = Field(description="median step time (as localearn bench)")
    bp_step_time_s: float = Field(description="BP's median step time in the same bench, the "
                                              "denominator of time_ratio")
    time_ratio: float = Field(description="step_time_s / bp_step_time_s")
    flops_per_image: float
    flops_ratio: float | None = Field(description="training FLOPs per image / BP's")
    memory: MemoryResult
    time: BenchResult


class FrontierReport(BaseModel):
    """``localearn frontier --json``: the setting and one point per rule, BP among them."""

    model: str
    k: int | None = Field(description="the K asked for; an end-to-end rule (bp) runs at K=1")
    batch_size: int
    input_size: int
    device: str
    threads: int = Field(description="torch's intra-op threads while timing")
    memory_steps: int
    warmup: int
    steps: int
    baseline: str = BASELINE
    points: list[FrontierPoint]


def rule_spec(setting: RunSpec, rule: str) -> RunSpec:
    """``rule`` on ``setting``, resolved (its K the one trained). A rule that refuses the
    setting's K but runs at K=1 by default (end-to-end BP, with or without checkpointing) runs
    at K=1; any other refusal is the rule's own one-line error."""
    spec = setting.model_copy(update={"rule": rule})
    try:
        return resolve(spec)
    except UserError as exc:
        if spec.k is None:
            raise
        first = exc
    try:
        alone = resolve(spec.model_copy(update={"k": None}))
    except UserError:
        alone = None
    if alone is None or alone.k != 1:
        raise first from None
    return alone


def _check(rules: list[str], memory_steps: int, warmup: int, steps: int) -> None:
    if not rules:
        raise UserError("no rules to measure; give at least one --rule")
    for name, value, least in (("--memory-steps", memory_steps, 1), ("--warmup", warmup, 0),
                               ("--steps", steps, 1)):
        if value < least:
            raise UserError(f"invalid {name}: must be >= {least} (got {value})")


def measure_frontier(setting: RunSpec, rules: list[str] | tuple[str, ...] = DEFAULT_RULES, *,
                     memory_steps: int = 2, warmup: int = 2, steps: int = 10,
                     progress: Callable[[str], None] | None = None) -> FrontierReport:
    """Peak memory and step time of every rule on ``setting`` (its ``rule`` is ignored), each
    against BP measured in this same call. BP is added first when ``rules`` lacks it.

    Every rule and BP is checked before anything is measured. Memory: `measure_memory`, one
    fresh process per rule, without the separate resident-set pass (only the tensor peak is
    used). Time: `bench` of each rule against BP, interleaved in this process; BP's own step
    time is the median of all its timed steps across those benches."""
    rules = list(rules)
    _check(rules, memory_steps, warmup, steps)
    say = progress or (lambda line: None)
    specs = [rule_spec(setting, r) for r in rules]
    base = resolve(setting.model_copy(update={"rule": BASELINE, "k": None}))
    seen: dict[tuple[str, int | None], str] = {}
    for given, s in zip(rules, specs):
        if (s.rule, s.k) in seen:
            raise UserError(f"rule {given!r} is given twice (as {seen[(s.rule, s.k)]!r}); give "
                            "each rule once")
        seen[(s.rule, s.k)] = given
    if (base.rule, base.k) not in seen:
        specs.insert(0, base)
    is_base = [(s.rule, s.k) == (base.rule, base.k) for s in specs]

    n = len(specs)
    memory: list[MemoryResult] = []
    for i, s in enumerate(specs, 1):
        say(f"memory {i}/{n}: {s.label()}, in a fresh process")
        memory.append(measure_memory(s, memory_steps, rss_pass=False))

    # per rule, its own bench result and the BP steps it was timed against (None for BP: its
    # point pools BP's steps from every bench)
    own_time: list[BenchResult | None] = []
    bp_time: list[BenchResult | None] = []
    timed = [s for s, b in zip(specs, is_base) if not b]
    for s, b in zip(specs, is_base):
        if b:
            own_time.append(None)
            bp_time.append(None)
            continue
        say(f"time {timed.index(s) + 1}/{len(timed)}: {s.label()}, interleaved with "
            f"{base.label()}")
        report = bench(s, vs=BASELINE, warmup=warmup, steps=steps)
        own_time.append(report.rule)
        bp_time.append(report.baseline)
    if not timed:  # BP alone
        say(f"time: {base.label()}")
    bp = _pooled([t for t in bp_time if t is not None]
                 or [bench(base, vs=None, warmup=warmup, steps=steps).rule])

    bp_memory = memory[is_base.index(True)]
    points = []
    for s, mem, own, against in zip(specs, memory, own_time, bp_time):
        own, against = own or bp, against or bp
        points.append(FrontierPoint(
            rule=s.rule, k=s.k, peak_bytes=mem.peak_bytes,
            memory_ratio=mem.peak_bytes / bp_memory.peak_bytes if bp_memory.peak_bytes else 1.0,
            step_time_s=own.median_step_s, bp_step_time_s=against.median_step_s,
            time_ratio=own.median_step_s / against.median_step_s,
            flops_per_image=own.flops_per_image,
            flops_ratio=own.flops_per_image / bp.flops_per_image if bp.flops_per_image else None,
            memory=mem, time=own))
    return FrontierReport(
        model=setting.model, k=setting.k, batch_size=setting.batch_size,
        input_size=setting.input_size, device=memory[0].device,
        threads=torch.get_num_threads(), memory_steps=memory_steps, warmup=warmup, steps=steps,
        points=points)


def _pooled(runs: list[BenchResult]) -> BenchResult:
    """BP's timed steps from every bench, as one result (median over all of them)."""
    first = runs[0]
    step_times = [t for r in runs for t in r.step_times_s]
    median = statistics.median(step_times)
    flops = first.flops_per_image * first.spec.batch_size
    return BenchResult(spec=first.spec, device=first.device, step_times_s=step_times,
                       median_step_s=median, images_per_s=first.spec.batch_size / median,
                       flops_per_image=first.flops_per_image, achieved_flops_per_s=flops / median)


def _title(report: FrontierReport) -> str:
    k = f" K={report.k}" if report.k is not None else ""
    return (f"{report.model}{k}, batch {report.batch_size}, "
            f"3x{report.input_size}x{report.input_size}, {report.device}")


def format_frontier(report: FrontierReport) -> str:
    """The table: per rule, peak memory and step time, each also as a ratio to BP."""
    header = ["rule", "K", "peak (MiB)", "memory / BP", "step (ms)", "time / BP", "FLOPs / BP"]
    rows = [[p.rule, str(p.k), f"{p.peak_bytes / 2**20:.1f}", f"{p.memory_ratio:.3f}",
             f"{1000 * p.step_time_s:.0f}", f"{p.time_ratio:.3f}",
             "-" if p.flops_ratio is None else f"{p.flops_ratio:.3f}"] for p in report.points]
    method = report.points[0].memory.peak_method
    title = (f"frontier: {_title(report)}, {report.threads} threads; peak over "
             f"{report.memory_steps} training steps ({method}), each rule in a fresh process; "
             f"step time: median of {report.steps} steps interleaved with {report.baseline} "
             f"after {report.warmup} warm-up steps")
    return title + "\n" + _table(header, rows)


def plot_frontier(report: FrontierReport, out: Path, title: str | None = None) -> Path:
    """Draw the memory-time plane into the PNG ``out``: x step time / BP, y peak memory / BP,
    one labelled point per rule, BP at (1, 1) on dashed lines at 1. The caller has checked
    ``out`` with `localearn.outputs.check_output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from localearn.plot import save_png

    xs = [p.time_ratio for p in report.points]
    ys = [p.memory_ratio for p in report.points]
    x_max = max(1.0, *xs) * 1.12
    y_max = max(1.0, *ys) * 1.12
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=100)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    for p, x, y in zip(report.points, xs, ys):
        bp = p.rule == report.baseline
        ax.scatter([x], [y], s=36, zorder=3, color="black" if bp else "tab:blue")
    ax.set_xlim(0, x_max)
    ax.set_ylim(0, y_max)
    name = report.baseline.upper()
    ax.set_xlabel(f"step time / {name}")
    ax.set_ylabel(f"peak training memory / {name}")
    ax.set_title(title or f"memory and step time against {name}: {_title(report)}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()  # first: the labels are placed in the final axes
    _label(fig, ax, [p.rule for p in report.points], xs, ys)
    return save_png(fig, out)


#: where a label may sit around its point: (x, y) offset in points, horizontal and vertical
#: alignment; tried in this order until one overlaps no other label and stays in the axes
PLACES = [((5, 4), "left", "bottom"), ((5, -4), "left", "top"), ((-5, 4), "right", "bottom"),
          ((-5, -4), "right", "top")]


def _label(fig, ax, labels: list[str], xs: list[float], ys: list[float]) -> None:
    """Name every point, moving a label around its point while it would overlap a point, a
    label already placed or leave the axes (the first place is kept if none fits)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = ax.transData.transform(list(zip(xs, ys)))
    placed = [Bbox.from_extents(cx - 4, cy - 4, cx + 4, cy + 4) for cx, cy in centres]
    for label, x, y in zip(labels, xs, ys):
        for offset, ha, va in PLACES:
            text = ax.annotate(label, (x, y), xytext=offset, textcoords="offset points",
                               ha=ha, va=va, fontsize=8)
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 \
                and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
            if (offset, ha, va) != PLACES[-1]:
                text.remove()
            else:  # nowhere fits: the first place, overlapping
                text.remove()
                text = ax.annotate(label, (x, y), xytext=PLACES[0][0],
                                   textcoords="offset points", ha=PLACES[0][1],
                                   va=PLACES[0][2], fontsize=8)
                box = text.get_window_extent(renderer)
        placed.append(box)
