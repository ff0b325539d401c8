"""Run folders, run summaries and exports: a plain `fit` gets a new
folder and never touches an earlier run's; an unfinished run says how to resume it; the
summary agrees with ``metrics.jsonl``; an exported file loads into the plain backbone and
classifies as the trained network does."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from localearn_plugins.dgl import DGL
from safetensors import safe_open
from safetensors.torch import load_file

import localearn
from localearn import registry
from localearn.cli import main
from localearn.data.datasets import DIGIT_CLASSES, digits
from localearn.engine import checkpoint
from localearn.models.cifar_resnet import CifarResNet
from localearn.runlog import git_commit


def tiny_resnet(num_classes: int = 10, **_) -> torch.nn.Module:
    """CIFAR ResNet-8 at half width: stem + 3 blocks (4 units), ~20k parameters."""
    return CifarResNet(1, num_classes, widths=(8, 16, 32))


# 64 digits in batches of 32: 2 steps an epoch
FIT = ["fit", "--model", "tiny", "--rule", "dgl", "--k", "2", "--epochs", "2",
       "--train-limit", "64", "--test-limit", "32", "--batch-size", "32", "--device", "cpu"]
NAME = re.compile(r"\d{8}-\d{6}-dgl-tiny-k2(-\d+)?")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One finished run, trained through the Python API without an output folder, in a fresh
    working directory; the tiny backbone registered for the session."""
    root = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_SESSION", {kind: {} for kind in registry.GROUPS})
        mp.chdir(root)
        localearn.register_model("tiny", tiny_resnet)
        result = localearn.fit(rule="dgl", model="tiny", k=2, epochs=2, train_limit=64,
                               test_limit=32, batch_size=32, device="cpu")
        yield root, result


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_plain_fit_gets_a_new_folder_and_never_touches_an_earlier_one(first, monkeypatch,
                                                                       capsys):
    root, result = first
    monkeypatch.chdir(root)
    run1 = result.run_dir
    assert run1.parent == Path("runs") and NAME.fullmatch(run1.name), run1
    before = _snapshot(run1)
    assert {"checkpoint.pt", "summary.json", "metrics.jsonl", "steps.jsonl",
            "config.json"} <= before.keys()

    assert main(FIT) == 0
    out = capsys.readouterr().out
    runs = sorted(Path("runs").iterdir())
    assert len(runs) == 2
    run2 = next(r for r in runs if r != run1)
    assert NAME.fullmatch(run2.name)
    assert f"run folder {run2}" in out.splitlines()[0]  # said at the start
    assert _snapshot(run1) == before  # not a byte, not a time stamp changed
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["command"] == shlex.join(["localearn", *FIT])

    # naming the finished run's folder is refused in one line, and leaves it as it was
    assert main([*FIT, "--out", str(run1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a finished run" in err and "--overwrite" in err
    assert _snapshot(run1) == before


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("results")
    made = [checkpoint.new_run_dir("a", tmp_path) for _ in range(2)]
    assert made == [tmp_path / "a-2", tmp_path / "a-3"]
    assert (tmp_path / "a" / "keep.txt").read_text() == "results"
    assert checkpoint.run_name("mlaan(dgl, k=3)", "resnet32", 16).endswith(
        "-mlaan-dgl-k3-resnet32-k16")


def test_an_unfinished_run_says_how_to_resume_it(first, monkeypatch, capsys):
    root, result = first
    monkeypatch.chdir(root)
    # the first epoch's state of a 2-epoch run, as a step checkpoint in its own folder
    ckpt = torch.load(result.checkpoint, weights_only=True)
    ckpt.update(epoch=1, epoch_done=True, step=2, history=ckpt["history"][:1])
    folder = Path("runs/unfinished")
    checkpoint.atomic_save(ckpt, checkpoint.step_path(folder, 2))

    assert main([*FIT, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unfinished run" in err
    assert f"localearn fit --resume {folder};" in err  # the command to continue it

    # --resume alone: the newest run under runs/, continued in its own folder
    assert main(["fit", "--resume"]) == 0
    assert f"resuming from {checkpoint.step_path(folder, 2)}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert not (folder / "checkpoints").exists()


def test_a_short_run_logs_steps_and_leaves_no_empty_checkpoint_folder(first):
    run = first[0] / first[1].run_dir
    assert not (run / "checkpoints").exists()
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    # 2 steps an epoch, far below log_every=50: each epoch's first and last step
    assert [(r["epoch"], r["step"]) for r in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)]


def test_summary_agrees_with_metrics(first):
    root, result = first
    run = root / result.run_dir
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accs = [r["test_acc"] for r in rows]
    assert s == result.summary | {"config": s["config"]}  # what fit returned, as saved
    assert s["epochs"] == len(rows) == 2 and s["steps"] == rows[-1]["step"] == 4
    assert s["last_test_acc"] == accs[-1] and s["best_test_acc"] == max(accs)
    assert s["best_epoch"] == 1 + accs.index(max(accs))
    assert s["images"] == sum(r["images"] for r in rows) == 2 * 64
    assert s["train_time_s"] == pytest.approx(sum(r["epoch_time"] for r in rows))
    assert s["images_per_s"] == pytest.approx(s["images"] / s["train_time_s"])
    assert s["wall_time_s"] >= s["train_time_s"]
    assert s["peak_mem_mb"] >= max(r["peak_mem_mb"] for r in rows) > 0
    # parameters by role: the backbone counted from a fresh model, DGL's heads the rest
    backbone = sum(p.numel() for p in tiny_resnet(10).parameters())
    heads = sum(p.numel() for p in result.aux.parameters())
    assert s["parameters"] == {"backbone": backbone, "heads": heads, "total": backbone + heads}
    assert s["config"] == json.loads((run / "config.json").read_text())
    assert s["config"]["output_dir"] == str(result.run_dir)
    assert s["versions"]["torch"] == torch.__version__
    assert s["versions"]["localearn"] == localearn.__version__
    assert s["git"] == git_commit() and s["command"] is None  # localearn's own checkout


def test_git_commit_of_the_project(tmp_path):
    assert git_commit(tmp_path) is None  # outside git: no failure
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f.txt").write_text("x")
    subprocess.run([*git, "add", "f.txt"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], cwd=tmp_path, check=True)
    head = (tmp_path / ".git" / "refs" / "heads" / "main").read_text().strip()
    assert git_commit(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("y")
    assert git_commit(tmp_path) == {"commit": head, "dirty": True}


def test_export_loads_into_the_plain_backbone_with_the_same_logits(first, monkeypatch,
                                                                   capsys):
    root, result = first
    monkeypatch.chdir(root)
    out = root / "tiny.safetensors"
    assert main(["export", str(result.run_dir), "-o", str(out)]) == 0
    data = digits(train_limit=64, test_limit=32)  # as trained: the mean is of those 64
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "tiny" and meta["dataset"] == "digits"
    assert int(meta["num_classes"]) == 10
    assert json.loads(meta["input_shape"]) == [3, 32, 32]
    assert json.loads(meta["mean"]) == pytest.approx(list(data.info.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(data.info.std))
    assert json.loads(meta["class_names"]) == list(DIGIT_CLASSES)

    images = torch.stack([data.test[i][0] for i in range(16)])
    result.net.eval()
    with torch.no_grad():
        trained = result.net(images)
        # torchvision/timm style: the registered model built by name, then load_state_dict
        plain = registry.load("model", meta["model"])(num_classes=int(meta["num_classes"]))
        plain.load_state_dict(load_file(str(out)))
        plain.eval()
        fresh = tiny_resnet(10).eval()
        model, info = localearn.load_backbone(out)
        assert torch.allclose(plain(images), trained, rtol=0, atol=1e-5)
        assert torch.allclose(model(images), trained, rtol=0, atol=1e-5)
        assert not torch.allclose(fresh(images), trained, atol=1e-2)  # the weights matter
    assert info["class_names"] == DIGIT_CLASSES and info["input_shape"] == (3, 32, 32)
    assert os.path.getsize(out) > 0


def test_seeds_without_a_folder_get_one_new_folder(first, monkeypatch):
    root, _ = first
    monkeypatch.chdir(root)
    proto = DGL()
    repeats = localearn.fit(rule=proto, model="tiny", k=2, epochs=1, train_limit=64,
                            test_limit=32, batch_size=32, device="cpu", seeds=[1, 2])
    parent = repeats.run_dir
    assert parent.parent == Path("runs") and parent.name.endswith("-dgl-tiny-k2-seeds"), parent
    assert sorted(p.name for p in parent.iterdir()) == ["seed-1", "seed-2", "seeds.json"]
    assert [r.run_dir for r in repeats.results] == [parent / "seed-1", parent / "seed-2"]
    # each seed trained a fresh copy of the rule object, never the same heads twice
    a, b = (r.rule for r in repeats.results)
    assert a is not b and a is not proto and not proto.heads
    saved = json.loads((parent / "seeds.json").read_text())
    assert saved["test_acc"] == [r.test_acc for r in repeats.results]


def test_runlog_keeps_a_csv_and_the_console_log(tmp_path, monkeypatch):
    import logging

    from localearn.runlog import LOGGER, RunLog

    monkeypatch.setattr(LOGGER, "handlers", [])
    monkeypatch.setattr(LOGGER, "propagate", False)
    old = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    try:
        log = RunLog(tmp_path)
        log.start({"rule": "dgl"}, [], 0)
        LOGGER.info("epoch 1/2")
        LOGGER.warning("a short epoch")
        log.epoch({"epoch": 1, "step": 4, "local_losses": [0.5, 0.25], "test_acc": 0.5})
        log.close()
        LOGGER.info("after the run")  # not the run's
        assert (tmp_path / "log.txt").read_text() == \
            "epoch 1/2\nlocalearn: warning: a short epoch\n"
        # a resumed run appends; the CSV is rewritten from the history kept
        log = RunLog(tmp_path)
        history = [{"epoch": 1, "step": 4, "local_losses": [0.5, 0.25], "test_acc": 0.5}]
        log.start({"rule": "dgl"}, history, 4)
        LOGGER.info("resumed")
        log.epoch({"epoch": 2, "step": 8, "local_losses": [0.4, 0.2], "test_acc": 0.75,
                   "warning": "short"})
        log.close()
    finally:
        LOGGER.setLevel(old)
    assert (tmp_path / "log.txt").read_text().splitlines()[-1] == "resumed"
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,local_losses_0,local_losses_1,test_acc,warning",
        "1,4,0.5,0.25,0.5,", "2,8,0.4,0.2,0.75,short"]
