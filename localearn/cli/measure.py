"""The ``localearn memory``, ``localearn bench`` and ``localearn frontier`` subcommands (logic
in `localearn.measure` and `localearn.frontier`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from localearn.cli.common import JSON_HELP

#: what ``frontier`` measures without --rule (`localearn.frontier.DEFAULT_RULES`, kept here so
#: that --help does not import torch)
FRONTIER_RULES = ("bp", "bp(checkpoint=sqrt)", "dgl", "infopro", "auglocal", "man(dgl)",
                  "hpff(dgl)", "mlaan(dgl)", "mlaan(dgl, recompute=true)")


def _common(p: argparse.ArgumentParser, batch_size: int, *, rule: bool = True,
            many: bool = False) -> None:
    if many:
        p.add_argument("--rule", action="append", metavar="RULE",
                       help="rule expression (default: dgl); with --stages, repeat it to time "
                            "several rules side by side, e.g. --rule dgl --rule "
                            "'bp(schedule=one_f_one_b)'")
    elif rule:
        p.add_argument("--rule", default="dgl", help="rule expression (default: dgl)")
    p.add_argument("--model", default="resnet32", help="registered model (default: resnet32)")
    p.add_argument("--k", type=int, help="number of local modules K (default: the rule's)")
    p.add_argument("--split", default="even",
                   help="how units are grouped into modules: even, balanced, public or "
                        "cuts:3,5,8 (as in fit)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per step (default: {batch_size})")
    p.add_argument("--input-size", type=int, default=32,
                   help="height and width of the synthetic square input (default: 32)")
    p.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N (GPU "
                        "number N) (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="32", metavar="{32,bf16,16}",
                   help="32 (default), bf16 or 16: autocast, as in fit")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for model and inputs, as in fit")
    if rule:
        p.add_argument("--vs-k", type=int,
                       help="K of the baseline (default: --k if the baseline accepts it, else "
                            "its own default)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def _spec(args: argparse.Namespace, rule: str | None = None):
    from localearn.measure import make_spec

    return make_spec(rule=rule or args.rule, model=args.model, k=args.k, split=args.split,
                     batch_size=args.batch_size, input_size=args.input_size,
                     num_classes=args.num_classes, device=args.device, seed=args.seed,
                     precision=args.precision, channels_last=args.channels_last)


def _progress(args: argparse.Namespace):
    if args.json:
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)


def _vs(value: str) -> str | None:
    return None if value.lower() == "none" else value


def cmd_memory(args: argparse.Namespace) -> int:
    from localearn.errors import UserError
    from localearn.measure import format_memory, memory_report

    if args.steps < 1:
        raise UserError(f"invalid --steps: must be >= 1 (got {args.steps})")
    report = memory_report(_spec(args), vs=_vs(args.vs), vs_k=args.vs_k, steps=args.steps,
                           rss_pass=args.rss_pass, progress=_progress(args))
    print(json.dumps(report.model_dump(mode="json"), indent=2) if args.json
          else format_memory(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from localearn.errors import UserError
    from localearn.measure import bench, format_bench

    rules = args.rule or ["dgl"]
    if args.stages > 1:
        from localearn.measure_stages import bench_rules, format_side_by_side, format_stages

        reports = bench_rules([_spec(args, rule=r) for r in rules], args.stages,
                              microbatches=args.microbatches, stage_cuts=args.stage_cuts,
                              stage_mode=args.stage_mode, warmup=args.warmup,
                              steps=args.steps, threads=args.threads,
                              progress=_progress(args))
        if len(reports) == 1:
            print(reports[0].model_dump_json(indent=2) if args.json
                  else format_stages(reports[0]))
        elif args.json:
            print(json.dumps({"reports": [r.model_dump(mode="json") for r in reports]},
                             indent=2))
        else:
            print(format_side_by_side(reports))
        return 0
    if len(rules) > 1:
        raise UserError("several --rule are timed side by side with --stages N only; without "
                        "it, bench times one rule against --vs")
    if args.microbatches != 1:
        raise UserError("--microbatches applies with --stages N only")

    report = bench(_spec(args, rule=rules[0]), vs=_vs(args.vs), vs_k=args.vs_k,
                   warmup=args.warmup, steps=args.steps, progress=_progress(args))
    print(json.dumps(report.model_dump(mode="json"), indent=2) if args.json
          else format_bench(report))
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    from localearn.frontier import format_frontier, measure_frontier, plot_frontier
    from localearn.outputs import check_outputs

    targets = [(flag, path, png) for flag, path, png in
               (("-o", args.output, True), ("--json-out", args.json_out, False)) if path]
    check_outputs(targets, overwrite=args.overwrite)  # before the work, not after
    report = measure_frontier(_spec(args, rule="bp"), args.rule or FRONTIER_RULES,
                              memory_steps=args.memory_steps, warmup=args.warmup,
                              steps=args.steps, progress=_progress(args))
    data = report.model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else format_frontier(report))
    if args.json_out:
        from localearn.engine.checkpoint import atomic_write_text
        from localearn.outputs import protect

        protect(args.json_out, "--json-out")
        atomic_write_text(args.json_out, json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr, flush=True)
    if args.output:
        print(f"wrote {plot_frontier(report, args.output)}", file=sys.stderr, flush=True)
    return 0


def add_commands(subparsers) -> None:
    """Add ``memory``, ``bench`` and ``frontier`` to the ``localearn`` command's subparsers."""
    mem = subparsers.add_parser(
        "memory", help="peak training memory and bytes by role (each run in a fresh process)",
        description="Run real training steps on synthetic data and report parameter bytes by "
                    "role, gradient and optimizer-state bytes and the peak training memory "
                    "(CUDA: max_memory_allocated; CPU: profiler allocation events, with the "
                    "process's peak RSS beside it). Every configuration runs in a fresh process.")
    _common(mem, batch_size=128)
    mem.add_argument("--vs", default="none",
                     help="baseline rule measured on the same model and batch, e.g. bp "
                          "(default: none)")
    mem.add_argument("--steps", type=int, default=2, help="training steps (default: 2)")
    mem.add_argument("--no-rss-pass", dest="rss_pass", action="store_false",
                     help="on CPU, skip the unprofiled pass that measures the resident set: "
                          "half the time, but the peak RSS then includes the profiler's buffers")
    mem.set_defaults(func=cmd_memory)

    b = subparsers.add_parser(
        "bench", help="step time, images/s and FLOPs of a rule against a baseline",
        description="Time a rule and a baseline interleaved in one process after a warm-up "
                    "(A B A B ...), report median step time, images/s, FLOPs per image "
                    "(FlopCounterMode) and achieved FLOP/s, with the ratios.")
    _common(b, batch_size=128, many=True)
    b.add_argument("--vs", default="bp", help="baseline rule, or none (default: bp)")
    b.add_argument("--warmup", type=int, default=2, help="warm-up steps each (default: 2)")
    b.add_argument("--steps", type=int, default=10,
                   help="timed steps each, interleaved (default: 10)")
    b.add_argument("--stages", type=int, default=1,
                   help="time pipelined training in N processes (one per stage) against one "
                        "process instead of a baseline rule (default: 1, off)")
    b.add_argument("--stage-cuts", help="with --stages: the modules where stages 1.. start "
                                        "(default: balanced by measured time)")
    b.add_argument("--stage-mode", choices=["sync", "async"], default="sync",
                   help="with --stages, for MLAAN-family rules: sync or async (as in fit)")
    b.add_argument("--threads", type=int, default=1,
                   help="with --stages: threads per process (default: 1)")
    b.add_argument("--microbatches", type=int, default=1,
                   help="with --stages: cut each batch into N microbatches for the rules that "
                        "take them, e.g. bp(schedule=...); the others train it whole "
                        "(default: 1)")
    b.set_defaults(func=cmd_bench)

    f = subparsers.add_parser(
        "frontier", help="peak memory and step time of several rules against BP, as a table "
                         "and a picture",
        description="Measure every rule on one setting with the memory measurement of "
                    "'localearn memory' (each rule in a fresh process) and the step time of "
                    "'localearn bench' (each rule interleaved with BP), both as ratios to BP "
                    "measured in the same call; print the table, and draw the memory-time "
                    "plane with -o.")
    f.add_argument("--rule", action="append", metavar="RULE",
                   help="a rule expression; repeat for several, e.g. --rule dgl --rule "
                        "'mlaan(dgl, recompute=true)'; bp is always measured (default: "
                        + ", ".join(FRONTIER_RULES) + ")")
    _common(f, batch_size=128, rule=False)
    f.add_argument("-o", "--output", type=Path, metavar="FILE.png",
                   help="PNG of the memory-time plane to write (default: none)")
    f.add_argument("--json-out", type=Path, metavar="FILE",
                   help="JSON file to write (the --json report)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never a run's own files)")
    f.add_argument("--memory-steps", type=int, default=2,
                   help="training steps of each memory measurement (default: 2)")
    f.add_argument("--warmup", type=int, default=2, help="warm-up steps each (default: 2)")
    f.add_argument("--steps", type=int, default=10,
                   help="timed steps each, interleaved with BP (default: 10)")
    f.set_defaults(func=cmd_frontier)
