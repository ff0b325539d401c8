"""Pipelined training (``fit --stages N``): a run of a purely local rule split into stages, one
process each, ends bitwise equal to the one-process run (one thread per process); resume after
SIGKILL is exact; a stage that dies stops the others with one line; bad stage settings are one
line. The cuts balancer is checked against brute force in test_partition.py."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from localearn import expr, registry
from localearn.cli import main
from localearn.engine.stages import check_pipelinable, parse_stage_cuts
from localearn.errors import SameOnEveryRank

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "pipeline_job.py"
# 4 batches of 32 per epoch, K=4: a few seconds of work per process
BASE = ["--model", "resnet32", "--k", "4", "--dataset", "digits", "--train-limit", "128",
        "--test-limit", "64", "--batch-size", "32", "--lr", "0.05", "--no-progress"]


def _job_module():
    """tests/pipeline_job.py, loaded in this process (its rule and dataset)."""
    spec = importlib.util.spec_from_file_location("pipeline_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCALEARN_TIMEOUT="60")
    env.pop("RANK", None)
    return env


def one_process(args: list[str]) -> None:
    """The reference run, in this process on one thread (as each pipelined process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["fit", *args]) == 0
    finally:
        torch.set_num_threads(threads)


def torchrun(nproc: int, args: list[str], **kw) -> subprocess.Popen:
    # torchrun through localearn's wrapper, as `localearn fit --stages` starts it
    cmd = [sys.executable, "-c", "import sys; from localearn.distributed import torchrun; "
           "sys.exit(torchrun(sys.argv[1:]))", "--standalone", f"--nproc-per-node={nproc}",
           str(JOB), "fit", *args]
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun's workers have their own process
    groups), children first seen before any is killed."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def same_runs(a: Path, b: Path) -> None:
    """Weights, buffers, optimizer state and history of two finished runs are bitwise equal."""
    x = torch.load(a / "checkpoint.pt", weights_only=False)
    y = torch.load(b / "checkpoint.pt", weights_only=False)
    for part in ("model", "aux"):
        assert x[part].keys() == y[part].keys()
        for key in x[part]:
            assert torch.equal(x[part][key], y[part][key]), f"{part}.{key} differs"
    sx, sy = x["optimizer"]["state"], y["optimizer"]["state"]
    assert sx.keys() == sy.keys() and len(sx) > 0
    for i in sx:
        for name in sx[i]:
            assert torch.equal(torch.as_tensor(sx[i][name]), torch.as_tensor(sy[i][name]))
    keys = ("train_loss", "train_acc", "local_losses", "test_acc", "batches")
    assert [{k: r[k] for k in keys} for r in x["history"]] == \
        [{k: r[k] for k in keys} for r in y["history"]]
    assert x["step"] == y["step"]


@pytest.mark.parametrize("text, why", [
    ("4,x", "expected the module indices"), ("4", r"3 stages need 2 cut\(s\)"),
    ("3,3", "increase strictly"), ("0,2", "increase strictly"), ("2,4", "increase strictly")])
def test_bad_stage_cuts_are_one_line(text, why):
    with pytest.raises(SameOnEveryRank, match=why):
        parse_stage_cuts(text, 4, 3)
    assert parse_stage_cuts("1,3", 4, 3) == [1, 3]


def test_rules_that_cannot_be_pipelined_are_refused(capsys):
    for text in ("auglocal", "mlaan(dgl, recompute=true)"):
        with pytest.raises(SameOnEveryRank, match="is neither|drop recompute"):
            rule = expr.build(text)
            check_pipelinable(rule, 16, 2)
    with pytest.raises(SameOnEveryRank, match="needs at least 3 local modules"):
        check_pipelinable(expr.build("dgl"), 2, 3)
    # from the command line: one line, exit 2, before any worker starts
    assert main(["fit", "--rule", "auglocal", "--stages", "2", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stages trains rules" in err[0]


def test_two_stages_equal_one_process_dgl(tmp_path):
    one_process([*BASE, "--rule", "dgl", "--epochs", "1", "--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "localearn", "fit", *BASE, "--rule", "dgl", "--epochs", "1",
           "--stages", "2", "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stdout
    same_runs(tmp_path / "one", tmp_path / "two")


def test_three_stages_equal_one_process_infopro(tmp_path):
    args = [*BASE, "--rule", "infopro", "--epochs", "1"]
    one_process([*args, "--out", str(tmp_path / "one")])
    job = torchrun(3, [*args, "--stages", "3", "--stage-cuts", "1,3",
                       "--out", str(tmp_path / "three")])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    same_runs(tmp_path / "one", tmp_path / "three")


def test_mlaan_on_three_stages_in_sync_mode_equals_one_process(tmp_path):
    """Cascades of depth 3 cross both boundaries (their gradients go back a stage) and the
    first stage's last LAM reads a twin of a block on the second stage."""
    args = [*BASE, "--rule", "mlaan(dgl, k=3, p=2)", "--k", "6", "--epochs", "1"]
    one_process([*args, "--out", str(tmp_path / "one")])
    job = torchrun(3, [*args, "--stages", "3", "--stage-cuts", "2,4",
                       "--out", str(tmp_path / "three")])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    same_runs(tmp_path / "one", tmp_path / "three")


@pytest.fixture
def reach():
    """The job script's cascading rule, registered in this process for the test only."""
    registry.register("rule", "reach", _job_module().Reach)
    yield
    registry._SESSION["rule"].pop("reach", None)


def test_a_third_party_cascading_rule_pipelines_exactly(tmp_path, reach):
    """A rule outside the first-party plugins whose losses cross module (and so stage)
    boundaries trains on 3 stages bitwise as in one process: the engine needs to know nothing
    of it beyond the StepContext primitives it calls."""
    args = [*BASE, "--rule", "reach", "--epochs", "1"]
    one_process([*args, "--out", str(tmp_path / "one")])
    job = torchrun(3, [*args, "--stages", "3", "--stage-cuts", "1,3",
                       "--out", str(tmp_path / "three")])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    same_runs(tmp_path / "one", tmp_path / "three")


def test_async_mode_needs_k_minus_1_modules_per_stage():
    from localearn.build import build_run
    from localearn.config import FitConfig
    from localearn.engine.stages import stage_ranges
    from localearn.interfaces import DataInfo

    cfg = FitConfig(rule="mlaan(dgl, k=3, p=2)", k=6, device="cpu", output_dir=Path("."))
    run = build_run(cfg, info=DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(SameOnEveryRank, match=r"at least k-1=2 modules .*; stage 0 holds 1"):
        check_pipelinable(run.rule, 6, 3, starts=[1, 4], mode="async")
    check_pipelinable(run.rule, 6, 3, starts=[2, 4], mode="async")
    # stage 0 (modules 0, 1) is reached by cascades ending at 2 and 3 (depth 3)
    stage0 = stage_ranges([2, 4], 6)[0]
    assert run.rule.incoming(stage0, 6) == [2, 3] and run.rule.late_modules(stage0, 6) == {0, 1}


def test_mlaan_async_mode_trains(tmp_path):
    """Async mode: the next stage's gradients and twins one step late; it runs to the end,
    its losses finite and falling (its accuracy cost is measured in docs/results.md)."""
    args = [*BASE, "--rule", "mlaan(dgl, k=2, p=1)", "--epochs", "2", "--stages", "2",
            "--stage-mode", "async", "--out", str(tmp_path / "async")]
    job = torchrun(2, args)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    rows = torch.load(tmp_path / "async" / "checkpoint.pt", weights_only=False)["history"]
    losses = [r["train_loss"] for r in rows]
    assert all(loss == loss and loss < 1e3 for loss in losses) and losses[1] < losses[0]


@pytest.fixture
def pipeprobe():
    """The job script's rule, registered in this process for the test only."""
    registry.register("rule", "pipeprobe", _job_module().Probe)
    yield
    registry._SESSION["rule"].pop("pipeprobe", None)


def test_third_party_rule_resumes_exactly_after_sigkill(tmp_path, pipeprobe):
    args = [*BASE, "--rule", "pipeprobe", "--epochs", "3", "--checkpoint-every", "2"]
    one_process([*args, "--out", str(tmp_path / "one")])
    run = tmp_path / "two"
    job = torchrun(2, [*args, "--stages", "2", "--out", str(run)])
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*.pt")):
        assert job.poll() is None, job.communicate()[1]
        time.sleep(0.2)
    kill_tree(job.pid)  # every process of the job, without warning
    job.communicate()
    assert not (run / "checkpoint.pt").exists()  # it did not finish
    resumed = torchrun(2, [*args, "--stages", "2", "--out", str(run), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in out
    same_runs(tmp_path / "one", run)


@pytest.fixture
def short_digits():
    """The job script's short stream, registered in this process for the test only."""
    registry.register("dataset", "short_digits", _job_module().short_digits)
    yield
    registry._SESSION["dataset"].pop("short_digits", None)


def test_later_stages_read_no_data_and_a_short_stream_ends_every_stage(tmp_path, monkeypatch,
                                                                       short_digits):
    # the stream states 128 samples (4 batches of 32) but holds 80: every epoch ends early
    # on stage 0, and stages 1 and 2, which read nothing themselves, must end there too (not
    # wait for a batch that never comes: stage 0 tells stage 1, which tells stage 2)
    args = [*BASE, "--rule", "dgl", "--epochs", "2"]
    args[args.index("digits")] = "short_digits"
    monkeypatch.setenv("HELD", "80")
    one_process([*args, "--out", str(tmp_path / "one")])
    monkeypatch.setenv("READS_DIR", str(tmp_path))
    job = torchrun(3, [*args, "--stages", "3", "--stage-cuts", "1,3", "--out",
                       str(tmp_path / "three")])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    same_runs(tmp_path / "one", tmp_path / "three")
    history = torch.load(tmp_path / "three" / "checkpoint.pt", weights_only=False)["history"]
    assert all(0 < row["batches"] < 4 for row in history)  # short epochs, both
    assert (tmp_path / "reads-0").read_text() == str(2 * 80)  # stage 0 read every sample
    assert (tmp_path / "reads-1").read_text() == (tmp_path / "reads-2").read_text() == "0"


def test_a_dead_stage_stops_the_others_with_one_line(tmp_path):
    job = torchrun(2, [*BASE, "--rule", "pipeprobe(crash_at=3)", "--epochs", "2", "--stages", "2",
                       "--out", str(tmp_path / "run")])
    start = time.time()
    out, err = job.communicate(timeout=120)  # no hang
    assert job.returncode != 0
    assert time.time() - start < 120
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("localearn: error:")]
    assert errors and all("pipelined job stopped" in line for line in errors), err


def test_bench_stages_reports_throughput_and_idle(capsys):
    """`localearn bench --stages 2` times the pipelined job and one process (figures vary with
    the machine's load: only their presence and sanity are asserted)."""
    args = ["bench", "--rule", "dgl", "--k", "4", "--batch-size", "8", "--stages", "2",
            "--steps", "2", "--warmup", "1", "--stage-cuts", "2", "--json"]
    assert main(args) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    p = report["pipelined"]
    assert p["stages"] == 2 and p["starts"] == [2] and p["images_per_s"] > 0
    assert len(p["idle"]) == 2 and all(0 <= v <= 1 for v in p["idle"])
    assert set(report["one_process"]) == {"1", "2"}
    assert report["speedup"]["1"] == pytest.approx(p["images_per_s"]
                                                   / report["one_process"]["1"])
    # the first timed step fills the pipeline: the rate needs at least one more
    assert main([*args[:-5], "--steps", "1", "--warmup", "1", "--stage-cuts", "2"]) == 2
    assert "bench --stages needs at least 2" in capsys.readouterr().err


def test_sigterm_on_stages_stops_every_stage_at_one_step_with_a_checkpoint(tmp_path):
    """A stop asked on a pipelined job ends every stage at the same step with a checkpoint
    and the resume hint, as one process does (the lagged statistics read after the stop are
    not mistaken for a non-finite loss)."""
    run = tmp_path / "run"
    args = [*BASE, "--train-limit", "1024"]  # 32 steps an epoch: the stop lands mid-epoch
    cmd = [sys.executable, "-m", "localearn", "fit", *args, "--rule", "dgl", "--epochs", "40",
           "--stages", "2", "--out", str(run)]
    job = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    steps = run / "steps.jsonl"
    while time.time() < deadline and not (steps.is_file() and steps.read_text().strip()):
        assert job.poll() is None, job.communicate()[1]
        time.sleep(0.2)
    time.sleep(1.0)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, err
    assert "nan" not in err and "Traceback" not in err, err
    assert err.count("stopped by SIGTERM") == 1 and "--resume" in err, err
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    saved = torch.load(newest, weights_only=True)
    assert saved["step"] > 1 and f"at step {saved['step']} " in err and str(newest) in err
    assert not (run / "checkpoint.pt").exists()
