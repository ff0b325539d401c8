"""End-to-end BP pipelined over stages on torch's schedules (``bp(schedule=...)`` with
``--stages N --microbatches M``): one step's gradients, BatchNorm buffers and stepped weights
equal one-process BP over the same microbatches, with GPipe and 1F1B, and with 2 replicas per
stage; a run killed mid-epoch and resumed ends bitwise equal to the one-process run; bad
``--microbatches`` and schedule settings are one line.

Why the reference accumulates the same microbatches: BatchNorm normalises each microbatch on
its own, so a pipelined step is the whole batch's step only for a network without it.
Tolerance: float32 sums of the same terms, possibly in another order (the schedule divides the
summed microbatch gradients by M, the replicas' all-reduce averages): rtol 1e-5, atol 1e-6.
Measured on one thread: no difference at all with one replica."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pipeline import BASE, _env, kill_tree, one_process, same_runs, torchrun

from localearn.build import build_run
from localearn.cli import main

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "bp_pipeline_job.py"
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _job():
    spec = importlib.util.spec_from_file_location("bp_pipeline_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(nproc: int, out: Path, microbatches: int, schedules: list[str]) -> None:
    cmd = [sys.executable, "-c", "import sys; from localearn.distributed import torchrun; "
           "sys.exit(torchrun(sys.argv[1:]))", "--standalone", f"--nproc-per-node={nproc}",
           str(JOB), str(out), str(microbatches), *schedules]
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _reference(job, schedule: str, microbatches: int, replica: int):
    """One process, one thread: the step on ``replica``'s batch; (gradients, buffers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = build_run(job.config(schedule, microbatches, 1), info=job.INFO,
                        device=torch.device("cpu"))
        run.net.train()
        run.step(*job.batch(replica))
        grads = {n: p.grad.clone() for n, p in run.net.named_parameters()}
        return grads, dict(run.net.named_buffers()), dict(run.net.named_parameters())
    finally:
        torch.set_num_threads(threads)


def _compare(saved: dict, grads: dict, buffers: dict, params: dict) -> None:
    assert saved["grads"] and saved["buffers"]
    for name, g in saved["grads"].items():
        torch.testing.assert_close(g, grads[name], **TOL, msg=f"gradient of {name}")
    for name, b in saved["buffers"].items():
        torch.testing.assert_close(b, buffers[name], **TOL, msg=f"buffer {name}")
    for name, p in saved["params"].items():
        torch.testing.assert_close(p, params[name].detach(), **TOL, msg=f"weight {name}")


def test_one_step_equals_one_process_bp_over_the_same_microbatches(tmp_path):
    """GPipe and 1F1B, 2 stages (modules 0-1 | 2-3), 4 microbatches of 4 images."""
    job = _job()
    _launch(2, tmp_path, 4, ["gpipe", "one_f_one_b"])
    for schedule in ("gpipe", "one_f_one_b"):
        grads, buffers, params = _reference(job, schedule, 4, replica=0)
        stages = [torch.load(tmp_path / f"grads-{schedule}-{r}.pt") for r in range(2)]
        assert [s["stage"] for s in stages] == [0, 1]
        assert set(stages[0]["grads"]).isdisjoint(stages[1]["grads"])
        assert set(stages[0]["grads"]) | set(stages[1]["grads"]) == set(grads)
        for saved in stages:
            _compare(saved, grads, buffers, params)
    # the whole batch at once is another step (BatchNorm sees 16 images, not 4): the
    # comparison above tells microbatching apart
    whole, _, _ = _reference(job, "gpipe", 1, replica=0)
    assert any(not torch.allclose(whole[n], g, **TOL) for n, g in grads.items())


def test_two_stages_times_two_replicas_average_the_replicas_gradients(tmp_path):
    """Ranks stage-major (rank = stage * 2 + replica); each replica pipelines its own batch,
    a stage's replicas average their gradients."""
    job = _job()
    _launch(4, tmp_path, 2, ["one_f_one_b"])
    refs = [_reference(job, "one_f_one_b", 2, replica=r) for r in range(2)]
    mean = {n: (refs[0][0][n] + refs[1][0][n]) / 2 for n in refs[0][0]}
    for rank in range(4):
        saved = torch.load(tmp_path / f"grads-one_f_one_b-{rank}.pt")
        stage, replica = divmod(rank, 2)
        assert saved["stage"] == stage
        for name, g in saved["grads"].items():
            torch.testing.assert_close(g, mean[name], **TOL, msg=f"gradient of {name}")
        for name, b in saved["buffers"].items():  # each replica normalised its own batch
            torch.testing.assert_close(b, refs[replica][1][name], **TOL, msg=f"buffer {name}")


def test_pipelined_bp_resumes_exactly_after_sigkill(tmp_path):
    """2 stages, 1F1B, 4 microbatches; killed once a mid-run checkpoint exists, resumed: the
    same weights, buffers, optimizer state and history as one process over the same
    microbatches."""
    args = [*BASE, "--rule", "bp(schedule=one_f_one_b)", "--microbatches", "4", "--epochs", "2",
            "--checkpoint-every", "3"]
    one_process([*args, "--out", str(tmp_path / "one")])
    run = tmp_path / "two"
    job = torchrun(2, [*args, "--stages", "2", "--stage-cuts", "2", "--out", str(run)])
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*.pt")):
        assert job.poll() is None, job.communicate()[1]
        time.sleep(0.2)
    kill_tree(job.pid)
    job.communicate()
    assert not (run / "checkpoint.pt").exists()
    resumed = torchrun(2, [*args, "--stages", "2", "--stage-cuts", "2", "--out", str(run),
                           "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in out
    same_runs(tmp_path / "one", run)


@pytest.mark.parametrize("args, why", [
    (["--rule", "bp", "--microbatches", "3"], "invalid --microbatches 3: it must divide "
                                              "--batch-size 32"),
    (["--rule", "dgl", "--microbatches", "2"], "invalid --microbatches 2: dgl trains each "
                                               "batch whole"),
    (["--rule", "bp", "--microbatches", "0"], "microbatches"),
    (["--rule", "bp", "--microbatches", "2", "--no-drop-last"], "last partial batch"),
    (["--rule", "bp(schedule=one_f_one_b)", "--stages", "2"],
     "needs at least 2 microbatches"),
    (["--rule", "bp", "--stages", "2", "--microbatches", "2"],
     r"name one, bp\(schedule=one_f_one_b\) or bp\(schedule=gpipe\)"),
    (["--rule", "bp(schedule=pipedream)"], "bad value 'pipedream' for option 'schedule'"),
    (["--rule", "bp", "--k", "4"], "pipeline it: bp\\(schedule=one_f_one_b\\)"),
])
def test_bad_microbatches_and_schedules_are_one_line(args, why, capsys, tmp_path):
    base = [a for a in BASE if a not in ("--k", "4")]  # plain bp trains K=1
    assert main(["fit", *base, *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("localearn: error:"), err
    assert re.search(why, err[0]), err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was built


def test_fp16_and_recomputation_on_stages_are_refused():
    """(The CPU refuses --precision 16 before this check: it is for GPU stages.)"""
    from localearn import expr
    from localearn.engine.stages import check_pipelinable
    from localearn.errors import SameOnEveryRank

    with pytest.raises(SameOnEveryRank, match="take no fp16 loss scaling; use --precision bf16"):
        check_pipelinable(expr.build("bp(schedule=gpipe)"), 4, 2, precision="16")
    with pytest.raises(SameOnEveryRank, match="drop checkpoint=... on stages"):
        check_pipelinable(expr.build("bp(schedule=gpipe, checkpoint=sqrt)"), 4, 2)
    assert check_pipelinable(expr.build("bp(schedule=gpipe)"), 4, 2, precision="bf16")


def test_bench_times_several_rules_side_by_side_only_on_stages(capsys):
    assert main(["bench", "--rule", "dgl", "--rule", "bp"]) == 2
    assert "side by side with --stages N only" in capsys.readouterr().err
    from localearn.measure_stages import StageBench, StagesReport, format_side_by_side

    def report(rule: str, rate: float, one: float) -> StagesReport:
        spec = {"rule": rule, "model": "resnet32", "k": 16, "batch_size": 128,
                "microbatches": 4 if rule.startswith("bp") else 1}
        p = StageBench(stages=2, threads=1, steps=10, images_per_s=rate, wall_s=1.0,
                       idle=[0.25, 0.5], starts=[6])
        return StagesReport(spec=spec, pipelined=p, one_process={1: one, 2: 2 * one},
                            speedup={1: rate / one, 2: rate / one / 2})

    text = format_side_by_side([report("bp(schedule=one_f_one_b)", 100.0, 80.0),
                                report("dgl", 150.0, 75.0)])
    rows = text.splitlines()
    assert "vs bp(schedule=one_f_one_b)" in rows[1]
    assert rows[2].split()[:7] == ["bp(schedule=one_f_one_b)", "16", "4", "6", "100.0",
                                   "80.0", "1.25x"]
    assert rows[3].split()[-1] == "1.50x" and "25%, 50%" in rows[3]
