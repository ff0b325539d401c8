"""`localearn frontier`: peak memory and step time of several rules against BP, as a table,
JSON and the memory-time plane. One real measurement on a tiny setting (its memory measured in
this process: a fresh process per rule costs seconds of start-up each, and `measure_memory`'s
isolation has its own tests in test_measure.py); the rest runs on fake measurements, so the
whole file stays fast."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from localearn import frontier
from localearn.cli import main
from localearn.cli.measure import FRONTIER_RULES
from localearn.frontier import FrontierReport
from localearn.measure import (
    BenchReport,
    BenchResult,
    MemoryResult,
    RunSpec,
    measure_memory_here,
)
from localearn.outputs import PNG_MAGIC

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread
TINY = ["--model", "resnet32", "--k", "2", "--batch-size", "8", "--device", "cpu",
        "--memory-steps", "1", "--warmup", "0", "--steps", "1"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (which must come first)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[int, str, str, Path, Path]:
    """One real frontier of bp and dgl (resnet32, K=2, batch 8, one step of each kind)."""
    folder = tmp_path_factory.mktemp("frontier")
    png, js = folder / "plane" / "frontier.png", folder / "frontier.json"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        patch.setattr(frontier, "measure_memory", measure_memory_here)
        code = main(["frontier", "--rule", "bp", "--rule", "dgl", *TINY, "-o", str(png),
                     "--json-out", str(js)])
    return code, out.getvalue(), err.getvalue(), png, js


def test_a_real_frontier_has_one_point_per_rule_and_bp_at_one(measured):
    code, out, err, png, js = measured
    assert code == 0, err
    report = FrontierReport.model_validate_json(js.read_text())
    assert [(p.rule, p.k) for p in report.points] == [("bp", 1), ("dgl", 2)]
    bp, dgl = report.points
    assert bp.memory_ratio == bp.time_ratio == bp.flops_ratio == 1.0
    assert dgl.memory_ratio == dgl.peak_bytes / bp.peak_bytes
    assert dgl.time_ratio == dgl.step_time_s / dgl.bp_step_time_s > 0
    assert dgl.memory.peak_method == "profiler memory events" and dgl.memory.steps == 1
    assert (report.model, report.k, report.batch_size, report.device) == \
        ("resnet32", 2, 8, "cpu")
    lines = out.splitlines()
    assert lines[0].startswith("frontier: resnet32 K=2, batch 8")
    assert lines[1].split() == ["rule", "K", "peak", "(MiB)", "memory", "/", "BP", "step",
                                "(ms)", "time", "/", "BP", "FLOPs", "/", "BP"]
    assert lines[3].split()[:2] == ["bp", "1"] and lines[3].split()[3] == "1.000"
    assert f"wrote {png}" in err and f"wrote {js}" in err
    width, height = png_size(png)
    assert width > 300 and height > 200 and png.stat().st_size < 200_000


def test_json_has_the_documented_fields(measured):
    data = json.loads(measured[4].read_text())
    assert {"model", "k", "batch_size", "input_size", "device", "threads", "memory_steps",
            "warmup", "steps", "baseline", "points"} <= set(data)
    assert {"rule", "k", "peak_bytes", "memory_ratio", "step_time_s", "bp_step_time_s",
            "time_ratio", "flops_per_image", "flops_ratio", "memory", "time"} \
        <= set(data["points"][0])


def test_outputs_are_never_replaced_without_overwrite(measured, capsys):
    png = measured[3]
    before = png.read_bytes()
    assert main(["frontier", "--rule", "dgl", *TINY, "-o", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert png.read_bytes() == before


@pytest.mark.parametrize("argv, says", [
    (["--rule", "bp", "--rule", "nope"], "unknown rule 'nope'"),
    (["--rule", "mlaan(dgl, k=)"], "malformed rule expression"),
    (["--rule", "dgl", "--rule", "dgl()"], "given twice"),
    (["--steps", "0"], "invalid --steps"),
    (["--memory-steps", "0"], "invalid --memory-steps"),
    (["--k", "0"], "invalid --k"),
    (["--k", "99"], "K=99 is out of range"),
    (["--batch-size", "x"], "invalid int value"),
])
def test_bad_input_is_one_line(argv, says, capsys):
    assert main(["frontier", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("localearn: error: ") and says in err, err


def test_the_cli_default_rules_are_the_librarys():
    assert FRONTIER_RULES == frontier.DEFAULT_RULES


def test_help_does_not_import_torch():
    probe = ("import sys\nfrom localearn.cli import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe, "frontier", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "False" and "memory-time" in r.stdout


# --------------------------------------------------------------------------- fake measurements

#: made-up peaks (bytes) and step times (seconds) by rule
PEAK = {"bp": 1000, "dgl": 250, "mlaan(dgl)": 900}
STEP = {"bp": 1.0, "dgl": 1.5, "mlaan(dgl)": 5.0}


def fake_memory(spec, steps, rss_pass=True):
    return MemoryResult(spec=spec, steps=steps, device="cpu", param_bytes={}, buffer_bytes={},
                        grad_bytes=0, optimizer_bytes=0, peak_bytes=PEAK[spec.rule],
                        peak_method="profiler memory events", peak_rss_bytes=0,
                        rss_pass=rss_pass, rss_before_bytes=0)


def fake_result(spec, step: float) -> BenchResult:
    return BenchResult(spec=spec, device="cpu", step_times_s=[step], median_step_s=step,
                       images_per_s=spec.batch_size / step, flops_per_image=STEP[spec.rule],
                       achieved_flops_per_s=1.0)


def fake_bench(spec, vs="bp", warmup=2, steps=10, **_):
    base = spec.model_copy(update={"rule": "bp", "k": 1})
    # BP is a little slower in the mlaan bench: each ratio uses its own bench's BP
    bp_step = 1.2 if spec.rule == "mlaan(dgl)" else 1.0
    return BenchReport(warmup=warmup, steps=steps, rule=fake_result(spec, STEP[spec.rule]),
                       baseline=fake_result(base, bp_step) if vs else None)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(frontier, "measure_memory", fake_memory)
    monkeypatch.setattr(frontier, "bench", fake_bench)


def test_bp_is_added_first_and_each_time_ratio_uses_its_own_bench(fake, capsys, tmp_path):
    png = tmp_path / "f.png"
    assert main(["frontier", "--rule", "dgl", "--rule", "mlaan(dgl)", "--k", "4",
                 "--device", "cpu", "--json", "-o", str(png)]) == 0
    report = FrontierReport.model_validate_json(capsys.readouterr().out)
    ratios = {p.rule: (p.k, p.memory_ratio, p.time_ratio, p.bp_step_time_s)
              for p in report.points}
    assert ratios == {"bp": (1, 1.0, 1.0, 1.1), "dgl": (4, 0.25, 1.5, 1.0),
                      "mlaan(dgl)": (4, 0.9, 5.0 / 1.2, 1.2)}
    bp = report.points[0]
    assert bp.time.step_times_s == [1.0, 1.2] and bp.step_time_s == 1.1  # pooled BP steps
    assert png_size(png)[0] > 300


def test_bp_alone_is_timed_on_its_own(fake, capsys):
    assert main(["frontier", "--rule", "bp", "--device", "cpu", "--json"]) == 0
    report = FrontierReport.model_validate_json(capsys.readouterr().out)
    assert [(p.rule, p.memory_ratio, p.time_ratio) for p in report.points] == [("bp", 1, 1)]


def test_end_to_end_rules_run_at_k_1_and_keep_their_options():
    setting = RunSpec(rule="bp", k=8, device="cpu")
    spec = frontier.rule_spec(setting, "bp(checkpoint=sqrt)")
    assert (spec.rule, spec.k) == ("bp(checkpoint=sqrt)", 1)
    assert frontier.rule_spec(setting, "dgl").k == 8
