"""The CLI end to end, in subprocesses."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from localearn.cli import main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "localearn", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_fit_end_to_end_writes_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run("fit", "--rule", "dgl", "--k", "4", "--epochs", "2", "--train-limit", "128",
            "--test-limit", "64", "--batch-size", "32", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "test acc" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert len(rows[0]["local_losses"]) == 3  # K=4: three auxiliary losses
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["config"]["k"] == 4
    # metrics.csv: the same rows, flat columns; log.txt: the logger's lines, as printed
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert [float(r["local_losses_2"]) for r in table] == [r["local_losses"][2] for r in rows]
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in rows]
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("training dgl on resnet32 (K=4)") and "epoch 2/2" in log[2]
    assert log == [line for line in r.stdout.splitlines() if not line.startswith("final ")]
    # resuming the finished run says it is finished, before any training; nothing rewritten
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = run("fit", "--resume", str(out))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "is finished (2 epochs of 2 done)" in again.stderr
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


def test_listings():
    rules = run("rules")
    assert rules.returncode == 0 and "dgl" in rules.stdout and "bp" in rules.stdout
    models = run("models")
    assert "resnet32" in models.stdout and "55 units" in models.stdout


@pytest.mark.parametrize("args,message", [
    (["fit", "--rule", "nope"], "unknown rule 'nope'; registered rules:"),
    (["fit", "--rule", "dgl(width=wide)"], "bad value 'wide' for option 'width'"),
    (["fit", "--rule", "dgl(depth=2)"], "unknown option 'depth' for rule 'dgl'"),
    (["fit", "--rule", "dgl((("], "malformed rule expression"),
    (["fit", "--k", "17"], "K=17 is out of range for model 'resnet32': valid K is 1..16"),
    (["fit", "--rule", "bp", "--k", "4"], "rule 'bp' trains end to end, so K must be 1"),
    (["fit", "--rule", "dgl", "--microbatches", "2"], "invalid --microbatches 2: dgl trains "
                                                      "each batch whole"),
    (["fit", "--lr", "-1"], "invalid lr: Input should be greater than 0"),
    (["fit", "--dataset", "imagenet1k"], "unknown dataset 'imagenet1k'"),
    (["fit", "--data-dir", "/no/such"], "data directory '/no/such' does not exist"),
    (["fit", "--dataset", "cifar10"], "CIFAR-10 not found: looked for"),
    (["fit", "--epochs", "many"], "invalid int value: 'many'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    # in this process (the same code path as the command; one case below runs the real one)
    args = [*args, "--output-dir", str(tmp_path)] if args[0] == "fit" else args
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err


def test_bad_input_in_a_real_process_is_one_line_exit_2(tmp_path):
    r = run("fit", "--rule", "dgl(width=wide)", "--output-dir", str(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bad value 'wide' for option 'width'" in r.stderr
