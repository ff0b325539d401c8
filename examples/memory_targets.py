"""Measure the memory and speed targets against BP and print the ratio tables.

Targets (CPU, 32x32 inputs, peak training memory relative to BP on the same model and batch):

- ResNet-110, K=55, batch 1024: ``mlaan(dgl)`` at most 0.20 of BP's peak;
- ResNet-32, K=16, batch 1024: ``mlaan(dgl)`` at most 0.50 of BP's peak;
- ``dgl`` at the same settings, so the cost of MLAAN's cascades and copies is visible;
- ResNet-32, K=16, batch 128: ``mlaan(dgl)``'s achieved FLOP/s at least 0.8 of BP's.

Every memory figure comes from a fresh process (`localearn.measure.measure_memory`); the
speed figures from `localearn.measure.bench` (interleaved, medians). Rules that are not
registered are skipped with a note. The full run is slow on a small CPU (BP on ResNet-110 at
batch 1024 needs about 10 GB and minutes per step); ``--batch-size 128`` gives a quick look.

    python examples/memory_targets.py                  # everything
    python examples/memory_targets.py --only resnet32 --skip-bench --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from localearn import registry
from localearn.errors import UserError
from localearn.measure import (
    MemoryReport,
    bench,
    format_bench,
    format_memory,
    human_bytes,
    make_spec,
    measure_memory,
    resolve,
)

#: (model, K, memory target for mlaan(dgl) as a fraction of BP's peak)
MEMORY_TARGETS = [("resnet32", 16, 0.50), ("resnet110", 55, 0.20)]
SPEED_TARGET = ("resnet32", 16, 128, 0.8)  # model, K, batch, min achieved FLOP/s ratio
RULES = ["mlaan(dgl)", "mlaan(dgl, recompute=true)", "dgl"]


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024, help="memory batch (1024)")
    parser.add_argument("--only", choices=[m for m, _, _ in MEMORY_TARGETS],
                        help="measure one model only")
    parser.add_argument("--rules", nargs="+", default=RULES, help=f"rules ({' '.join(RULES)})")
    parser.add_argument("--steps", type=int, default=2, help="memory: training steps (2)")
    parser.add_argument("--no-rss-pass", dest="rss_pass", action="store_false",
                        help="memory: one profiled pass only (half the time; the RSS then "
                             "includes the profiler's buffers)")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", type=Path, help="also write every report here")
    args = parser.parse_args()

    known = registry.available("rule")
    rules = [r for r in args.rules if r.split("(")[0] in known]
    for r in args.rules:
        if r not in rules:
            log(f"skipping {r}: rule {r.split('(')[0]!r} is not registered")
    dump: dict[str, object] = {"memory": [], "bench": []}
    summary: list[list[str]] = []
    speed: list[list[str]] = []
    if not args.skip_bench:
        model, k, batch, target = SPEED_TARGET
        for rule in rules:
            spec = make_spec(rule=rule, model=model, k=k, batch_size=batch, device=args.device)
            log(f"bench {rule} K={k} vs bp on {model}, batch {batch}")
            rep = bench(spec, vs="bp", warmup=2, steps=args.bench_steps)
            print(format_bench(rep), end="\n\n", flush=True)
            dump["bench"].append(rep.model_dump(mode="json"))
            save(args.json_out, dump)
            ratio = rep.achieved_flops_ratio or 0.0
            speed.append([f"{model} K={k} b={batch}", rule, f"{rep.time_ratio:.3f}",
                          f"{rep.flops_ratio:.3f}", f"{ratio:.3f}",
                          *verdict(rule, f">= {target:.2f}", ratio >= target)])

    for model, k, target in MEMORY_TARGETS:
        if args.only and model != args.only:
            continue
        base = resolve(make_spec(rule="bp", model=model, batch_size=args.batch_size,
                                 device=args.device))
        config = f"{model} K={k} b={args.batch_size}"
        log(f"measuring bp on {model}, batch {args.batch_size} (fresh process)")
        try:
            bp = measure_memory(base, args.steps, args.rss_pass)
        except (UserError, RuntimeError) as exc:
            summary.append(failed(config, "bp", exc))
            continue
        print(format_memory(MemoryReport(rule=bp)), end="\n\n", flush=True)
        for rule in rules:
            spec = resolve(base.model_copy(update={"rule": rule, "k": k}))
            log(f"measuring {rule} K={k} on {model}, batch {args.batch_size} (fresh process)")
            try:
                res = measure_memory(spec, args.steps, args.rss_pass)
            except (UserError, RuntimeError) as exc:  # e.g. killed for memory: go on
                summary.append(failed(config, rule, exc))
                continue
            report = MemoryReport(rule=res, baseline=bp, peak_ratio=res.peak_bytes / bp.peak_bytes,
                                  rss_ratio=res.peak_rss_bytes / bp.peak_rss_bytes)
            print(format_memory(report), end="\n\n", flush=True)
            dump["memory"].append(report.model_dump(mode="json"))
            save(args.json_out, dump)
            summary.append([config, rule,
                            human_bytes(res.peak_bytes), human_bytes(bp.peak_bytes),
                            f"{report.peak_ratio:.3f}", f"{report.rss_ratio:.3f}",
                            *verdict(rule, f"<= {target:.2f}", report.peak_ratio <= target)])

    if summary:
        print("peak training memory relative to BP (same model and batch, fresh processes)")
        _print(["config", "rule", "peak", "bp peak", "ratio", "RSS ratio", "target", ""],
               summary)
    if speed:
        print("\nspeed relative to BP (interleaved in one process, medians)")
        _print(["config", "rule", "time ratio", "FLOPs ratio", "FLOP/s ratio", "target", ""],
               speed)
    return 0


def verdict(rule: str, goal: str, met: bool) -> list[str]:
    """The target and whether it was met, for the mlaan(dgl) rows; the others are references."""
    if not rule.startswith("mlaan(dgl"):
        return ["(reference)", ""]
    return [goal, "met" if met else "MISSED"]


def failed(config: str, rule: str, exc: Exception) -> list[str]:
    """A summary row for a configuration whose worker failed (e.g. killed for memory)."""
    reason = f"failed: {str(exc).splitlines()[0]}"
    log(reason)
    return [config, rule, *"----", "", reason]


def save(path: Path | None, dump: dict) -> None:
    """Write the reports so far (a long run that is stopped keeps what it measured)."""
    if path is not None:
        path.write_text(json.dumps(dump, indent=2))


def _print(header: list[str], rows: list[list[str]]) -> None:
    rows = [r + [""] * (len(header) - len(r)) if len(r) < len(header) else r for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) if i < len(header) - 1 else 0
              for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
