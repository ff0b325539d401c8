"""Outputs never destroy a run's files: every command that writes checks its targets in one
shared place (`localearn.outputs`); ``table`` gives every preset its own folder; an
interrupted ``fit --seeds`` is finished by running the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from localearn.cli import main, table
from localearn.engine import checkpoint
from localearn.errors import UserError

TINY = ["--rule", "dgl", "--k", "2", "--train-limit", "64", "--test-limit", "32",
        "--batch-size", "32", "--device", "cpu", "--no-progress"]


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (one epoch of 64 digits)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    assert main(["fit", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_the_shared_check_knows_every_file_a_run_writes():
    from localearn import outputs

    assert set(checkpoint.RUN_FILES) <= set(outputs.RUN_FILES)


@pytest.mark.parametrize("argv, named", [
    (["analyze", "probe", "{run}", "-o", "{run}/checkpoint.pt"], "checkpoint.pt"),
    (["analyze", "probe", "{run}", "-o", "{tmp}/p.png", "--json", "{run}/summary.json"],
     "summary.json"),
    (["analyze", "cka", "{run}", "{run}", "-o", "{run}/config.png"], "config.json"),
    (["analyze", "features", "{run}", "-o", "{run}/metrics.jsonl", "--overwrite"],
     "metrics.jsonl"),
    (["evaluate", "{run}", "--dataset", "digits", "-o", "{tmp}/e.png", "--json",
      "{run}/config.json", "--overwrite"], "config.json"),
    (["plot", "{run}", "-o", "{run}/checkpoint.pt", "--overwrite"], "checkpoint.pt"),
    (["export", "{run}", "-o", "{run}/summary.json", "--overwrite"], "summary.json"),
    (["export", "{run}", "-o", "{run}/checkpoints/model.safetensors"], "checkpoints"),
])
def test_no_command_writes_over_a_runs_own_files(run, tmp_path, capsys, argv, named):
    before = _snapshot(run)
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert main([*argv, "--device", "cpu"] if argv[0] in ("analyze", "evaluate") else argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("localearn: error: ") and named in err
    assert "not even with --overwrite" in err
    assert _snapshot(run) == before
    assert not (run / "config.png").exists() and not (run / "checkpoints").exists()
    assert not list(tmp_path.iterdir())  # refused before any work: nothing written


def test_an_existing_output_needs_overwrite(run, tmp_path, capsys):
    png, js = tmp_path / "f.png", tmp_path / "f.json"
    argv = ["analyze", "features", str(run), "--images", "1", "--channels", "1", "--device",
            "cpu", "-o", str(png), "--json", str(js)]
    assert main(argv) == 0
    capsys.readouterr()
    first = js.read_bytes()
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert f"-o {png} exists; pass --overwrite" in err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads(js.read_bytes()) == json.loads(first)
    # the same for plot, whose existing PNG was once replaced silently
    assert main(["plot", str(run), "-o", str(png)]) == 2
    assert "exists; pass --overwrite" in one_line(capsys.readouterr().err)
    assert main(["plot", str(run), "-o", str(png), "--overwrite"]) == 0
    capsys.readouterr()
    # a PNG and a JSON on one file
    assert main([*argv[:-4], "-o", str(tmp_path / "x.json"), "--overwrite"]) == 2
    assert "also the -o output" in one_line(capsys.readouterr().err)


def test_a_link_to_a_runs_file_is_that_file(run, tmp_path, capsys):
    link = tmp_path / "innocent.png"
    link.symlink_to(run / "config.json")
    before = (run / "config.json").read_bytes()
    assert main(["plot", str(run), "-o", str(link), "--overwrite"]) == 2
    assert "settings file" in one_line(capsys.readouterr().err)
    assert (run / "config.json").read_bytes() == before


def test_export_of_an_unfinished_run_goes_to_its_folder_not_its_checkpoints(tmp_path):
    from localearn import outputs
    from localearn.cli.run import export_target

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    step = run / "checkpoints" / "step-000000002.pt"
    assert export_target(step, None) == run / "step-000000002.safetensors"
    with pytest.raises(UserError, match="checkpoints folder"):
        outputs.check_output(run / "checkpoints" / "x.safetensors")


def test_table_and_data_check_their_outputs(tmp_path, capsys):
    presets = tmp_path / "p"
    presets.mkdir()
    (presets / "a.toml").write_text('rule = "dgl"\n')
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["table", str(presets), "--out", str(afile)]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (src / name).write_bytes(b"")
    assert main(["data", "cifar10-shards", "--from", str(src), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "manifest.json exists; pass --overwrite" in err
    assert afile.read_text() == "keep" and (out / "manifest.json").read_text() == "{}"


# --------------------------------------------------------------------------- table folders
def test_presets_sharing_a_stem_get_their_own_folders(tmp_path):
    names = [tmp_path / "a.toml", tmp_path / "a.yaml", tmp_path / "b.yml",
             tmp_path / "d" / "c.toml"]
    got = table.preset_names(tmp_path, names)
    assert got == ["a.toml", "a.yaml", "b", "d/c"]
    assert len(set(got)) == len(got)


# ----------------------------------------------------------------------- fit --seeds again
def test_an_interrupted_seeds_run_is_finished_by_the_same_command(tmp_path, capsys):
    out = tmp_path / "set"
    argv = ["fit", *TINY, "--epochs", "2", "--seeds", "0,1", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "localearn", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # Ctrl-C in seed 0's last epoch
        seen.append(line)
        if line.startswith("epoch 1/2"):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, "".join(seen)
    hint = seen[-1]
    assert "finish every seed" in hint and "--seeds 0,1" in hint, hint
    seed0 = out / "seed-0"
    assert not (seed0 / "summary.json").exists() and checkpoint.list_checkpoints(seed0)
    assert not (out / "seed-1").exists() and not (out / "seeds.json").exists()
    # the same command: seed 0 resumed (its epochs 1 and 2 once each), seed 1 trained
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "resuming from" in text and f"wrote {out / 'seeds.json'}" in text
    epochs = [json.loads(r)["epoch"] for r in (seed0 / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    summary = json.loads((out / "seeds.json").read_text())
    accs = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["last_test_acc"]
            for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and summary["test_acc"] == accs
    # once more: both finished, read back, not trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert main(argv) == 0
    assert "training " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps
    assert json.loads((out / "seeds.json").read_text()) == summary
    # other settings into the same folder: refused, not mixed in
    assert main([*argv[:-4], "--epochs", "3", "--seeds", "0,1", "--out", str(out)]) == 2
    assert "other settings (epochs 2, now 3)" in one_line(capsys.readouterr().err)
