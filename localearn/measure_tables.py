"""The plain-text tables of ``localearn memory`` and ``localearn bench`` (their ``--json``
output is the report models themselves)."""

from __future__ import annotations

import torch

from localearn.measure_bytes import MemoryReport
from localearn.measure_speed import BenchReport


def human_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB."""
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
    """The memory table: bytes by role, gradients, optimizer state and peaks, with ratios."""
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
    """The bench table: step time, images/s, FLOPs per image and achieved FLOP/s, with ratios."""
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
