"""Saved runs and run folders: a run holds its folder for the whole run (a second run, or a
resume, into it is refused in one line; a lock left by a killed run is taken over and said),
every command reads a checkpoint through one reader that refuses malformed fields in one line,
a pipelined run exports like any other, and a resume takes the stored process count."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from localearn import distributed
from localearn.cli import main
from localearn.engine import checkpoint
from localearn.engine.checkpoint import SavedRun
from localearn.engine.rundir import LOCK_NAME, RunLock
from localearn.errors import UserError

TINY = ["--rule", "dgl", "--k", "2", "--train-limit", "64", "--test-limit", "32",
        "--batch-size", "32", "--device", "cpu", "--no-progress"]


def fit(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["fit", *TINY, *args])
    io_ = capsys.readouterr()
    return code, io_.out, io_.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run (shared by the tests that only read it)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["fit", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_a_folder_held_by_a_running_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out)
    assert held.acquire() is None
    try:
        code, _, err = fit(capsys, "--epochs", "1", "--out", str(out), "--overwrite")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "in use by a run still training" in err and "process" in err
        assert not (out / "checkpoint.pt").exists()
    finally:
        held.release()
    assert not (out / LOCK_NAME).exists()
    assert fit(capsys, "--epochs", "1", "--out", str(out))[0] == 0


def test_resume_while_the_run_is_training_is_refused(finished, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    held = RunLock(run)
    held.acquire()
    try:
        code, _, err = fit(capsys, "--epochs", "2", "--resume", str(run))
        assert code == 2 and "in use by a run still training" in err
    finally:
        held.release()


def test_a_stale_lock_of_a_killed_run_is_taken_over_and_said(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("process 999999 on elsewhere since yesterday\n")  # no lock
    code, out_text, err = fit(capsys, "--epochs", "1", "--out", str(out))
    assert code == 0, err
    assert "took over the lock" in out_text + err + caplog.text
    assert "process 999999 on elsewhere" in out_text + err + caplog.text
    assert not (out / LOCK_NAME).exists()  # released at the end


def _tampered(finished: Path, tmp_path: Path, change) -> Path:
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    change(state)
    path = tmp_path / "bad" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


MALFORMED = {
    "history": lambda s: s.update(history="not a list"),
    "rng": lambda s: s.update(rng=[{"torch": 3}]),
    "epoch": lambda s: s.update(epoch="one"),
    "config": lambda s: s.update(config=["rule", "dgl"]),
    "optimizer": lambda s: s["optimizer"].update(param_groups=[{"lr": 0.1}]),
}


@pytest.mark.parametrize("field", sorted(MALFORMED))
def test_malformed_fields_are_one_line_for_every_reader(field, finished, tmp_path, capsys):
    path = _tampered(finished, tmp_path, MALFORMED[field])
    with pytest.raises(UserError, match=f"malformed '{field}'"):
        SavedRun.open(path)
    for argv in (["fit", *TINY, "--epochs", "2", "--resume", str(path)],
                 ["export", str(path), "-o", str(tmp_path / "w.safetensors")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and f"malformed '{field}'" in err, err


def test_a_pipelined_run_exports_like_any_other(finished, tmp_path):
    def staged(s):
        s["config"].update(stages=2, stage_cuts="1", nproc=1)
    path = _tampered(finished, tmp_path, staged)
    out = main(["export", str(path), "-o", str(tmp_path / "staged.safetensors")])
    assert out == 0
    from safetensors.torch import load_file

    plain = load_file(str(tmp_path / "staged.safetensors"))
    ref = torch.load(finished / "checkpoint.pt", weights_only=True)["model"]
    assert plain and all(any(torch.equal(v, r) for r in ref.values()) for v in plain.values())


def test_resume_takes_the_stored_process_count(finished, tmp_path, monkeypatch, capsys):
    def two(s):
        s["config"].update(nproc=2)
        s["world_size"] = 2
    path = _tampered(finished, tmp_path, two)
    launched = []
    monkeypatch.setattr(distributed, "relaunch", lambda n, argv: launched.append(n) or 0)
    assert main(["fit", "--resume", str(path), "--epochs", "2"]) == 0
    assert launched == [2]  # not one process, silently: the run's own layout
    assert main(["fit", "--resume", str(path), "--epochs", "2", "--nproc", "3"]) == 0
    assert launched == [2, 3]  # unless told otherwise


def test_saved_run_rebuilds_in_one_process(finished):
    saved = SavedRun.open(finished)
    cfg = saved.fit_config()
    assert cfg.nproc == 1 and cfg.stages == 1 and cfg.device == "cpu"
    assert saved.info.num_classes == 10 and saved.step == saved.state["step"] > 0
    assert copy.deepcopy(saved.config) == checkpoint.saved_config(saved.path)


def test_the_best_epoch_is_kept_as_best_pt(tmp_path, capsys):
    out = tmp_path / "run"
    assert fit(capsys, "--epochs", "3", "--out", str(out))[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    best = SavedRun.open(out / "best.pt")
    assert best.state["epoch"] == summary["best_epoch"]  # the checkpoint of that epoch
    accs = [r["test_acc"] for r in best.state["history"]]
    assert accs[-1] == max(accs) == summary["best_test_acc"]
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert final["epoch"] == 3 and (summary["best_epoch"] < 3 or final["step"] == best.step)
