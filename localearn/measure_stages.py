"""``localearn bench --stages N``: the throughput of pipelined training against one process.

The pipelined run is N processes (one per stage, one thread each unless ``--threads``) started
by torchrun, each training its stage on a fixed synthetic batch with the engine's own `Step`
(under the `Pipeline` strategy); after the warm-up steps every process meets at a barrier and
runs the timed steps. The first timed step fills the pipeline (the last stage waits for the first
batch to cross every stage); images/s is the last stage's rate over the other steps, the rate at
which a full pipeline delivers trained batches, as through an epoch of training (fill and drain
happen
once an epoch). Each stage also reports its idle fraction over the same steps: the time it spent
blocked on another stage (receiving activations, reading the lagged statistics) over its time
in steps.
The baseline is the same rule in one process (one thread, and N threads: the same threads as
the pipelined job in all), timed the same way (its first timed step is one more warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from localearn.errors import UserError


class StageBench(BaseModel):
    stages: int
    threads: int
    steps: int
    images_per_s: float
    wall_s: float
    idle: list[float]  # per stage: time blocked on other stages / time in steps
    starts: list[int]  # the modules where stages 1.. start


class StagesReport(BaseModel):
    spec: dict
    pipelined: StageBench
    one_process: dict[int, float]  # threads -> images/s
    speedup: dict[int, float]  # threads of the one-process baseline -> pipelined / it


def _config(spec: dict, stages: int):
    from localearn.config import FitConfig

    return FitConfig(rule=spec["rule"], model=spec["model"], k=spec["k"], split=spec["split"],
                     batch_size=spec["batch_size"], seed=spec["seed"], device="cpu",
                     precision=spec["precision"], channels_last=spec["channels_last"],
                     stages=stages, stage_cuts=spec.get("stage_cuts"),
                     stage_mode=spec.get("stage_mode", "sync"),
                     microbatches=spec.get("microbatches", 1) if stages > 1 else 1,
                     output_dir=Path("."))


def _batch(spec: dict):
    torch.manual_seed(spec["seed"])
    size = spec["input_size"]
    images = torch.randn(spec["batch_size"], 3, size, size)
    if spec["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, spec["num_classes"], (spec["batch_size"],))


def _info(spec: dict):
    from localearn.interfaces import DataInfo

    size = spec["input_size"]
    return DataInfo(spec["num_classes"], (3, size, size), (0.5,) * 3, (0.5,) * 3)


def one_process(spec: dict, threads: int, warmup: int, steps: int) -> float:
    """Images/s of the rule in this process on ``threads`` threads."""
    from localearn.build import build_run

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = build_run(_config(spec, 1), info=_info(spec), device=torch.device("cpu"))
        run.net.train()
        run.aux.train()
        images, targets = _batch(spec)
        for _ in range(warmup + 1):  # + 1: the step the pipelined run spends filling
            run.step(images, targets)
        start = time.perf_counter()
        for _ in range(steps - 1):
            run.step(images, targets)
        return (steps - 1) * spec["batch_size"] / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)


def _stage_worker(spec: dict, warmup: int, steps: int, out: Path) -> None:
    import torch.distributed as dist

    from localearn import distributed as dist_
    from localearn.build import build_run

    env = dist_.current_env()
    dist_.init_process_group(env, torch.device("cpu"))
    try:
        run = build_run(_config(spec, spec["stages"]), info=_info(spec),
                        device=torch.device("cpu"), env=env)
        step, strategy = run.step, run.strategy
        run.net.train()
        run.aux.train()
        images, targets = _batch(spec)
        for _ in range(warmup):
            step(images, targets)
        step.drain()
        dist.barrier()
        step(images, targets)  # the pipeline fills: the last stage waits for the first batch
        strategy.waited = strategy.busy = 0.0
        start = time.perf_counter()
        for _ in range(steps - 1):
            step(images, targets)
        wall = time.perf_counter() - start  # the last stage's: batches leave at this rate
        idle = strategy.idle_fraction()
        step.drain()
        dist.barrier()
        idle = dist_.gather_objects(idle, env)
        walls = dist_.gather_objects(wall, env)
        if env.is_main:
            wall = walls[-1]
            result = StageBench(stages=spec["stages"], threads=torch.get_num_threads(),
                                steps=steps, images_per_s=(steps - 1) * spec["batch_size"] / wall,
                                wall_s=wall, idle=idle, starts=strategy.starts)
            out.write_text(result.model_dump_json())
    finally:
        dist_.destroy_process_group()


def pipelined(spec: dict, stages: int, threads: int, warmup: int, steps: int) -> StageBench:
    """Run the pipelined measurement as ``stages`` processes under torchrun."""
    with tempfile.TemporaryDirectory(prefix="localearn-stages-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", "import sys; from localearn.distributed import torchrun; "
               "sys.exit(torchrun(sys.argv[1:]))", "--standalone",
               f"--nproc-per-node={stages}", "-m", "localearn.measure_stages",
               json.dumps({**spec, "stages": stages}), str(warmup), str(steps), str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            lines = [ln for ln in done.stderr.splitlines() if ln.startswith("localearn: error")]
            raise UserError(lines[0].removeprefix("localearn: error: ") if lines else
                            f"the pipelined measurement failed (exit {done.returncode}): "
                            f"{done.stderr.strip().splitlines()[-1:] or ''}")
        return StageBench.model_validate_json(out.read_text())


def bench_stages(spec: dict, stages: int, warmup: int = 2, steps: int = 10,
                 threads: int = 1) -> StagesReport:
    """Pipelined images/s against one process on ``threads`` and on ``stages * threads``
    threads."""
    if stages < 2:
        raise UserError(f"invalid --stages {stages}: a pipeline has at least 2 stages")
    if steps < 2:
        raise UserError(f"invalid --steps {steps}: bench --stages needs at least 2 (the first "
                        "timed step fills the pipeline; the rate is taken over the others)")
    if spec["device"] not in ("auto", "cpu"):
        raise UserError("bench --stages measures on CPU processes (Gloo); GPU pipelines: "
                        "time `localearn fit --stages N --device cuda` runs")
    result = pipelined(spec, stages, threads, warmup, steps)
    base = {t: one_process(spec, t, warmup, steps) for t in sorted({threads, stages * threads})}
    return StagesReport(spec=spec, pipelined=result, one_process=base,
                        speedup={t: result.images_per_s / v for t, v in base.items()})


def bench_rules(specs: list, stages: int, *, microbatches: int = 1,
                stage_cuts: str | None = None, stage_mode: str = "sync", warmup: int = 2,
                steps: int = 10, threads: int = 1,
                progress: Callable[[str], None] | None = None) -> list[StagesReport]:
    """`bench_stages` for each rule of ``specs`` (`localearn.measure.RunSpec`), one after
    another, each checked first. ``microbatches`` go to the rules that take them on
    ``stages`` stages (`UpdateRule.microbatch_check`); the others train whole batches, and
    their one-process baseline always does."""
    from localearn import expr
    from localearn.engine.stages import check_microbatches
    from localearn.measure import resolve

    plans = []
    for spec in specs:
        spec = resolve(spec)
        rule = expr.build(spec.rule)
        m = microbatches if len(specs) == 1 or rule.microbatch_check(
            microbatches, stages) is None else 1
        check_microbatches(rule, m, spec.batch_size, stages)
        plans.append({**spec.model_dump(), "stage_cuts": stage_cuts, "stage_mode": stage_mode,
                      "microbatches": m})
    reports = []
    for plan in plans:
        if progress:
            progress(f"bench --stages {stages}: {plan['rule']}...")
        reports.append(bench_stages(plan, stages, warmup=warmup, steps=steps, threads=threads))
    return reports


def format_side_by_side(reports: list[StagesReport]) -> str:
    """One line per rule: its cut, pipelined and one-process images/s, their ratio, each
    stage's idle fraction, and the pipelined rate against the first rule's."""
    first = reports[0]
    p, s = first.pipelined, first.spec
    lines = [f"bench --stages {p.stages}: {s['model']}, batch {s['batch_size']}, CPU, "
             f"{p.threads} thread(s) per stage; {p.steps} timed steps after warm-up",
             f"  {'rule':<34} {'K':>3} {'mb':>3} {'cut':>5} {'pipelined':>10} "
             f"{'one proc':>9} {'ratio':>6}  {'idle per stage':<18} vs {s['rule']}"]
    for r in reports:
        one = r.one_process[min(r.one_process)]
        idle = ", ".join(f"{v:.0%}" for v in r.pipelined.idle)
        cut = ",".join(map(str, r.pipelined.starts))
        lines.append(f"  {r.spec['rule']:<34} {r.spec['k']:>3} "
                     f"{r.spec.get('microbatches', 1):>3} {cut:>5} "
                     f"{r.pipelined.images_per_s:>10.1f} "
                     f"{one:>9.1f} {r.pipelined.images_per_s / one:>5.2f}x  {idle:<18} "
                     f"{r.pipelined.images_per_s / p.images_per_s:.2f}x")
    lines.append("  (images/s; one proc: the same rule in one process on "
                 f"{min(first.one_process)} thread(s), whole batches; mb: microbatches; cut: "
                 "the modules where stages 1.. start)")
    return "\n".join(lines)


def format_stages(report: StagesReport) -> str:
    p, s = report.pipelined, report.spec
    mode = f", {s.get('stage_mode', 'sync')} mode"  # (local rules: the same either way)
    if s.get("microbatches", 1) > 1:
        mode += f", {s['microbatches']} microbatches"
    lines = [f"bench --stages {p.stages}: {s['rule']} on {s['model']} (K={s['k']}), batch "
             f"{s['batch_size']}, CPU{mode}; {p.steps} timed steps after warm-up (the rate over "
             f"the last {p.steps - 1}, the pipeline full)",
             f"  pipelined, {p.stages} processes x {p.threads} thread(s): "
             f"{p.images_per_s:.1f} images/s (stages start at modules 0, "
             f"{', '.join(map(str, p.starts))})",
             "  idle fraction per stage: " + ", ".join(f"{v:.0%}" for v in p.idle)]
    for t, v in report.one_process.items():
        lines.append(f"  one process x {t} thread(s): {v:.1f} images/s; pipelined / it: "
                     f"{report.speedup[t]:.2f}x")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="localearn.measure_stages")
    parser.add_argument("spec")
    parser.add_argument("warmup", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        _stage_worker(json.loads(args.spec), args.warmup, args.steps, args.out)
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"localearn: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
