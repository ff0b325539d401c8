"""Checkpoints and exact resume: SIGKILL mid-epoch, corrupt and mismatched files, NaN stops,
safetensors export."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localearn import registry
from localearn.cli import main
from localearn.config import make_config
from localearn.engine import Trainer, TrainingDiverged, checkpoint
from localearn.errors import UserError

# resnet32 cut in 4 modules, 128 digits in batches of 16: 8 steps an epoch, 16 in all,
# checkpoints at steps 3, 6, 8 (epoch end), 9, 12, 16
RUN = ["fit", "--rule", "dgl", "--k", "4", "--epochs", "2", "--train-limit", "128",
       "--test-limit", "64", "--batch-size", "16", "--checkpoint-every", "3", "--seed", "7",
       "--device", "cpu", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localearn", *RUN, *extra,
                             "--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint dict, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _start(full)  # the uninterrupted run, alongside
    victim = _start(killed)
    while not checkpoint.list_checkpoints(killed):
        assert victim.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint.pt").exists()  # it really was cut short

    # --resume alone: the newest checkpoint in --output-dir, with the settings stored in it
    r = subprocess.run([sys.executable, "-m", "localearn", "fit", "--resume", "--no-progress",
                        "--output-dir", str(killed)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "batch" in r.stdout, r.stdout  # mid-epoch
    out, err = reference.communicate()
    assert reference.returncode == 0, err

    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys()
    weights = [k for k in ta if k.startswith(("/model/", "/aux/", "/optimizer/"))]
    assert len(weights) > 400
    unequal = [k for k in weights if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal[:5]
    timing = ("epoch_time", "step_time", "images_per_s", "peak_mem_mb")

    def rows(run):
        return [{k: v for k, v in row.items() if k not in timing}
                for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert rows(full) == rows(killed) and len(rows(full)) == 2
    assert not list((killed / "checkpoints").glob("*.pt"))  # finished: only checkpoint.pt


def _diverge_at(trainer: Trainer, bad_step: int) -> None:
    """Make the rule report a NaN loss from step ``bad_step`` on (a diverging run)."""
    step = trainer.rule.train_step

    def train_step(ctx, net, images, targets):
        result = step(ctx, net, images, targets)
        if trainer.step + 1 >= bad_step:
            result.loss = math.nan
        return result

    trainer.rule.train_step = train_step


def test_nan_stop_corrupt_and_mismatched_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_config(rule="dgl", k=4, epochs=2, train_limit=64, test_limit=64, batch_size=16,
                      checkpoint_every=1, keep_checkpoints=3, device="cpu", progress=False,
                      output_dir=out)
    trainer = Trainer(cfg)  # 4 steps an epoch
    _diverge_at(trainer, 6)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    step5 = checkpoint.step_path(out, 5)
    msg = str(exc.value)
    assert "the loss became nan at step 6 (epoch 2)" in msg and f"--resume {step5}" in msg
    files = checkpoint.list_checkpoints(out)
    assert [p.name for p in files] == ["step-000000003.pt", "step-000000004.pt",
                                       "step-000000005.pt"]  # the last three, none after NaN
    assert checkpoint.read(step5)["step"] == 5
    capsys.readouterr()

    def cli(*args):
        code = main(["fit", "--output-dir", str(out), *args])
        return code, capsys.readouterr()

    # a fresh run may not bury the unfinished one
    code, io = cli("--no-progress")
    assert code == 2 and "holds the checkpoints of an unfinished run (step 5" in io.err

    # truncated newest checkpoint: refused, and the message names the previous one
    data = step5.read_bytes()
    step5.write_bytes(data[: len(data) // 2])
    code, io = cli("--resume")
    step4 = checkpoint.step_path(out, 4)
    assert code == 2 and io.err.count("\n") == 1, io.err
    assert f"checkpoint {step5} is corrupt or incomplete" in io.err
    assert f"resume from it with --resume {step4}" in io.err
    with pytest.raises(UserError, match="corrupt or incomplete"):
        checkpoint.read(step5)

    # one flipped byte inside a tensor record fails its CRC
    step3 = checkpoint.step_path(out, 3)
    blob = bytearray(step3.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    step3.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="corrupt or incomplete"):
        checkpoint.read(step3)

    # a checkpoint of another network is refused before anything is loaded
    code, io = cli("--resume", str(step4), "--k", "2")
    assert code == 2 and "belongs to another run: k 4 (now 2)" in io.err, io.err

    # the previous good one, when asked, continues the run to its end
    code, io = cli("--resume", str(step4))
    assert code == 0, io.err
    assert f"resuming from {step4}: step 4, end of epoch 1" in io.out
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert final["step"] == 8 and final["epoch_done"] and len(final["history"]) == 2

    # export: the plain backbone, with its own parameter names, gives the same logits
    st = tmp_path / "resnet32.safetensors"
    assert main(["export", str(out), "-o", str(st)]) == 0
    backbone = registry.load("model", "resnet32")(num_classes=10)
    backbone.load_state_dict(load_file(st))  # strict: every name matches
    net = Trainer(make_config(rule="dgl", k=4, device="cpu", train_limit=16,
                              output_dir=tmp_path / "x")).net
    net.load_state_dict(final["model"])
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(backbone.eval()(x), net.eval()(x))


@pytest.mark.slow
def test_streamed_shards_resume_exactly_with_workers(cifar_shards, tmp_path):
    """WebDataset streams cannot seek: resume reads and drops the done batches; loader workers
    are seeded from (seed, epoch, rank), so their augmentation repeats too."""

    def trainer(out, **extra):
        return Trainer(make_config(rule="dgl", k=2, dataset="cifar10-shards",
                                   data_dir=cifar_shards, train_limit=96, test_limit=32,
                                   batch_size=16, epochs=2, checkpoint_every=2, workers=2,
                                   device="cpu", progress=False, output_dir=tmp_path / out,
                                   **extra))

    full = trainer("full")
    reference = full.fit()
    cut = trainer("cut")
    step = cut.rule.train_step

    def interrupted(ctx, net, images, targets):
        if cut.step == 3:  # mid-epoch, one step after the checkpoint at step 2
            raise KeyboardInterrupt
        return step(ctx, net, images, targets)

    cut.rule.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = trainer("cut", resume="latest")
    result = resumed.fit()
    assert resumed.last_checkpoint is not None and result.step == reference.step == 12
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in result.history] == \
        [r["train_loss"] for r in reference.history]
