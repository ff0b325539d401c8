"""Nothing lost, nothing silently wrong: run folders, export targets, short and empty
epochs, divergence, exact resume on streamed shards, one-line errors, SIGTERM, pipe: URLs."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localearn import expr
from localearn.cli import main
from localearn.config import make_config
from localearn.data import cifar10_shards, make_loader
from localearn.data.webdata import CorruptDataWarning, ShardStream, pipes_allowed
from localearn.engine import Trainer, TrainingDiverged, checkpoint
from localearn.errors import UserError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 64 digits in batches of 32 with K=2: 2 steps an epoch, a few seconds a run
TINY = ["--rule", "dgl", "--k", "2", "--train-limit", "64", "--test-limit", "32",
        "--batch-size", "32", "--device", "cpu", "--no-progress"]


def fit_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["fit", *TINY, *args])
    io_ = capsys.readouterr()
    return code, io_.out, io_.err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tiny_cfg(out: Path, **kw):
    settings = dict(rule="dgl", k=2, train_limit=64, test_limit=32, batch_size=32, epochs=1,
                    device="cpu", progress=False, output_dir=out)
    return make_config(**{**settings, **kw})


# ------------------------------------------------------------------------------ run folders
def test_resume_of_a_moved_run_continues_in_its_own_folder(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert fit_cli(capsys, "--epochs", "1", "--output-dir", str(a))[0] == 0
    shutil.copytree(a, b)  # a copied (or moved) run; its checkpoint still names folder a
    before = (a / "checkpoint.pt").read_bytes()
    code, out, err = fit_cli(capsys, "--resume", str(b / "checkpoint.pt"), "--epochs", "2")
    assert code == 0, err
    assert (a / "checkpoint.pt").read_bytes() == before  # the original is untouched
    assert torch.load(b / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 2

    # into a folder that holds another run: refused, that run untouched
    assert fit_cli(capsys, "--epochs", "1", "--seed", "5", "--output-dir", str(c))[0] == 0
    kept = (c / "checkpoint.pt").read_bytes()
    code, _, err = fit_cli(capsys, "--resume", str(a / "checkpoint.pt"), "--epochs", "2",
                           "--output-dir", str(c))
    assert code == 2 and "holds another, finished run" in one_line(err)
    assert (c / "checkpoint.pt").read_bytes() == kept
    # an empty folder is fine: the run continues there
    code, _, err = fit_cli(capsys, "--resume", str(a / "checkpoint.pt"), "--epochs", "2",
                           "--output-dir", str(tmp_path / "d"))
    assert code == 0, err
    assert (a / "checkpoint.pt").read_bytes() == before


def test_a_new_run_does_not_replace_a_finished_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert fit_cli(capsys, "--epochs", "1", "--output-dir", str(out))[0] == 0
    old = (out / "checkpoint.pt").read_bytes()
    code, _, err = fit_cli(capsys, "--epochs", "1", "--seed", "3", "--output-dir", str(out))
    assert code == 2 and "holds a finished run" in one_line(err) and "--overwrite" in err
    assert (out / "checkpoint.pt").read_bytes() == old
    code, _, err = fit_cli(capsys, "--epochs", "1", "--seed", "3", "--overwrite",
                           "--output-dir", str(out))
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["seed"] == 3


def test_overwrite_clears_the_old_run_before_the_new_one_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in checkpoint.RUN_FILES:
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds a finished run"):
        checkpoint.claim_run_dir(out)
    checkpoint.claim_run_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # a user's file stays


def test_export_refuses_to_replace_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert fit_cli(capsys, "--epochs", "1", "--output-dir", str(out))[0] == 0
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    (tmp_path / "other.txt").write_text("mine")
    for target, extra, message in (
            (ckpt, [], "is a run's final checkpoint file"),
            (ckpt, ["--overwrite"], "not even with --overwrite"),
            (tmp_path, [], "is a folder"),
            (out / "config.json", [], "is a run's settings file"),
            (tmp_path / "other.txt", [], "exists; pass --overwrite"),
            (out / "config.json" / "x.st", [], "is a file, not a folder")):
        code = main(["export", str(out), "-o", str(target), *extra])
        assert code == 2 and message in one_line(capsys.readouterr().err), target
    assert ckpt.read_bytes() == before
    assert checkpoint.read(ckpt)["step"] == 2  # still a checkpoint
    copy = tmp_path / "other.pt"
    shutil.copy(ckpt, copy)
    assert main(["export", str(out), "-o", str(copy), "--overwrite"]) == 2
    assert "is a checkpoint" in capsys.readouterr().err
    st = tmp_path / "m.safetensors"
    assert main(["export", str(out), "-o", str(st)]) == 0
    assert main(["export", str(out), "-o", str(st), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------- short and empty epochs
def _png(rng: np.random.Generator, size=(32, 32)) -> bytes:
    img = Image.fromarray(rng.integers(0, 256, size=(*size, 3)).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def synthetic_cifar(root: Path, train: int, test: int = 8, *, bad: int = 0,
                    odd: int = 0) -> Path:
    """A cifar10-shards folder of random 32x32 PNGs: ``train`` samples, the first ``bad`` of
    them undecodable and the next ``odd`` of another size."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        members = []
        for i in range(n):
            image = (b"not an image" if split == "train" and i < bad
                     else _png(rng, (40, 28)) if split == "train" and i < bad + odd
                     else _png(rng))
            members += [(f"{split}{i:05d}.png", image), (f"{split}{i:05d}.cls", b"%d" % (i % 10))]
        write_shard(root / f"cifar10-{split}-000000.tar", members)
    return root


def test_an_epoch_without_samples_is_an_error(tmp_path, capsys):
    data = synthetic_cifar(tmp_path / "data", train=8, bad=8)
    with pytest.warns(CorruptDataWarning):
        code = main(["fit", "--rule", "dgl", "--k", "2", "--dataset", "cifar10-shards",
                     "--data-dir", str(data), "--batch-size", "4", "--epochs", "1",
                     "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "epoch 1 delivered no training batches of 4 (planned 2)" in line
    assert "8 undecodable samples" in line
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_far_fewer_samples_than_stated_is_a_warning_in_log_and_summary(tmp_path, capsys):
    data = synthetic_cifar(tmp_path / "data", train=16)
    (data / "manifest.json").write_text(json.dumps({"train": {"samples": 640},
                                                    "test": {"samples": 8}}))
    out = tmp_path / "run"
    code = main(["fit", "--rule", "dgl", "--k", "2", "--dataset", "cifar10-shards",
                 "--data-dir", str(data), "--batch-size", "8", "--epochs", "2",
                 "--device", "cpu", "--no-progress", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("localearn: warning: epoch") == 2
    assert "epoch 1 delivered 2 of 80 planned batches (2%, below 50%)" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["batches_short"] == 156
    assert len(summary["warnings"]) == 2 and "2 of 80" in summary["warnings"][0]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["batches"] == 2 and rows[0]["planned_batches"] == 80
    assert "warning" in rows[0]


# ---------------------------------------------------------------------------- divergence
def _blow_up_weights_at(trainer: Trainer, bad_step: int) -> None:
    """After step ``bad_step``'s optimizer step, one weight becomes infinite (the loss that
    step was finite: only the saved state could show it)."""
    step = trainer.optimizer.step

    def blown(*args, **kwargs):
        out = step(*args, **kwargs)
        if trainer.step + 1 >= bad_step:
            with torch.no_grad():
                next(trainer.net.parameters()).view(-1)[0] = float("inf")
        return out

    trainer.optimizer.step = blown


def test_no_checkpoint_with_infinite_weights_is_written_or_called_good(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(out, epochs=2, checkpoint_every=1))  # 4 steps
    _blow_up_weights_at(trainer, 4)  # the last step
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    msg = str(exc.value)
    step3 = checkpoint.step_path(out, 3)
    assert "became NaN, infinite or overflowing (beyond 1.8e19) by step 4" in msg
    assert f"--resume {step3}" in msg
    assert not (out / "checkpoint.pt").exists()
    assert [p.name for p in checkpoint.list_checkpoints(out)][-1] == step3.name
    assert checkpoint.read(step3)["step"] == 3  # the one it names is finite

    # a checkpoint with non-finite state (written by an older version) is refused on resume
    state = torch.load(step3, weights_only=True)
    next(iter(state["optimizer"]["state"].values()))["momentum_buffer"].view(-1)[0] = \
        float("nan")
    bad = tmp_path / "bad" / "checkpoint.pt"
    bad.parent.mkdir()
    torch.save(state, bad)
    with pytest.raises(UserError, match=r"holds NaN, infinite or overflowing values \(optim"):
        checkpoint.read(bad)


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "-inf"])
def test_learning_rate_must_be_finite_and_representable(value, capsys):
    assert main(["fit", f"--lr={value}"]) == 2
    assert "invalid lr" in one_line(capsys.readouterr().err)


def test_disk_full_during_a_checkpoint_write(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(out, epochs=2, checkpoint_every=1))
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as exc:
        trainer.fit()
    msg = str(exc.value)
    step1 = checkpoint.step_path(out, 1)
    assert "\n" not in msg and "no space left on the device" in msg
    assert f"the previous checkpoint {step1} is intact" in msg
    assert not list(checkpoint.checkpoint_dir(out).glob(".*.tmp"))  # the partial file is gone
    assert checkpoint.read(step1)["step"] == 1


def test_a_full_disk_run_resumed_with_keep_checkpoints_1_makes_progress(tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def disk_of_three(obj, f, *args, **kwargs):  # room for three checkpoint files
        if len(checkpoint.list_checkpoints(out)) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_of_three)
    # 4 steps an epoch, a checkpoint each step, three kept: the fourth finds the disk full
    with pytest.raises(UserError, match="no space left"):
        Trainer(tiny_cfg(out, train_limit=128, checkpoint_every=1, keep_checkpoints=3)).fit()
    assert checkpoint.list_checkpoints(out) == [checkpoint.step_path(out, n) for n in (1, 2, 3)]
    # resumed keeping one: the older two make room before the next is written
    result = Trainer(tiny_cfg(out, train_limit=128, checkpoint_every=1, keep_checkpoints=1,
                              resume=str(checkpoint.step_path(out, 3)))).fit()
    assert result.step == 4 and (out / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------- one clear line
@pytest.mark.parametrize("args,message", [
    (["--rule", "dgl(width=nan)"], "bad value 'nan' for option 'width'"),
    (["--rule", "dgl(width=inf)"], "bad value 'inf' for option 'width'"),
    (["--rule", "dgl(width=1e999)"], "option values must be finite numbers"),
    (["--rule", "infopro(widen=nan)"], "bad value 'nan' for option 'widen'"),
    (["--rule=" + "-" * 100_000 + "1"], "100001 characters, the longest read is 4096"),
    (["--rule=" + "+" * 100_000 + "dgl"], "100003 characters, the longest read is 4096"),
    (["--rule", "dgl(width=" + "+" * 4000 + "1)"], "malformed rule expression"),
    (["--rule", "mlaan(dgl, k=1e9)"], "bad value 1000000000.0 for option 'k'"),
    (["--rule", "mlaan(dgl, k=true)"], "bad value True for option 'k'"),
    (["--rule", "dgl(width=1, width=2)"], "option 'width' is given twice"),
    (["--device", "cuda:abc"], "unknown device 'cuda:abc'"),
    (["--device", "mps"], "no MPS (Apple GPU) support"),
    (["--seed", str(2**64)], "invalid seed"),
    (["--batch-size", "1"], "a batch of 1 image(s) cannot train the BatchNorm layers"),
    (["--train-limit", "1"], "a batch of 1 image(s) cannot train the BatchNorm layers"),
    (["--tensorboard"], "--tensorboard needs the tensorboard package"),
])
def test_mistakes_are_one_line(args, message, tmp_path, capsys):
    if args == ["--tensorboard"] and _installed("tensorboard"):
        pytest.skip("tensorboard is installed here")
    if args == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code = main(["fit", "--k", "2", "--train-limit", "16", "--test-limit", "16", "--epochs", "1",
                 "--no-progress", "--output-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in one_line(err)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_bad_output_folders_are_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, "is a file; pick a folder"),
                         (afile / "sub", f"{afile} is a file, not a folder"),
                         (tmp_path / ("a" * 300), "its name is too long")):
        code, _, err = fit_cli(capsys, "--output-dir", str(out))
        assert code == 2 and message in one_line(err), out
    if os.geteuid() != 0:  # root writes anywhere: simulated below instead
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, _, err = fit_cli(capsys, "--output-dir", str(ro / "run"))
        assert code == 2 and "not writable" in one_line(err)

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, _, err = fit_cli(capsys, "--output-dir", str(tmp_path / "new"))
    assert code == 2 and "read-only file system" in one_line(err)


def test_bad_config_files_are_one_line(tmp_path, capsys):
    scalar = tmp_path / "scalar.toml"
    scalar.write_text("fit = 3\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\x00\xff\xfe")
    nul = tmp_path / "nul.toml"
    nul.write_bytes(b"epochs = 1\x00\n")
    pipes = tmp_path / "pipes.toml"
    pipes.write_text("allow_pipe = true\n")
    for f, message in ((scalar, "'fit' must be a table of settings (got int 3)"),
                       (binary, "is not a text file"), (nul, "holds binary bytes"),
                       (pipes, "sets allow_pipe")):
        assert main(["fit", "--config", str(f)]) == 2
        assert message in one_line(capsys.readouterr().err), f


def test_plot_on_bad_files_and_targets(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\x89PNG\x00\xff")
    assert main(["plot", str(run), "-o", str(tmp_path / "a.png")]) == 2
    assert "not a JSONL text file" in one_line(capsys.readouterr().err)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": "high"}\n[1, 2]\n')
    assert main(["plot", str(run), "-o", str(tmp_path / "a.png")]) == 2
    assert "no epoch rows with a number" in one_line(capsys.readouterr().err)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.5}\n')
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for target, message in ((tmp_path, "is a folder"), (afile / "x.png", "is a file"),
                            (afile, "is not a PNG; refusing to replace it")):
        assert main(["plot", str(run), "-o", str(target)]) == 2
        assert message in one_line(capsys.readouterr().err), target
    assert afile.read_text() == "keep me"


def test_memory_and_bench_at_batch_size_1(capsys):
    assert main(["bench", "--k", "2", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                 "--vs", "none"]) == 2
    assert "cannot train the BatchNorm layers" in capsys.readouterr().err.splitlines()[-1]
    assert main(["memory", "--k", "2", "--batch-size", "1", "--steps", "1",
                 "--no-rss-pass"]) == 2
    assert "cannot train the BatchNorm layers" in capsys.readouterr().err.splitlines()[-1]


def test_nproc_validates_before_starting_workers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "localearn", "fit", "--nproc", "2", "--rule",
                        "foo", "--device", "cpu", "--output-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    assert "unknown rule 'foo'" in one_line(r.stderr)


def test_rule_options_are_strictly_typed():
    assert expr.build("mlaan(dgl, k=2)").k == 2
    assert expr.build("dgl(width=2)").width == 2.0  # an int is a fine number
    for text in ("mlaan(dgl, k=2.0)", "mlaan(dgl, k=True)", "dgl(width=true)",
                 "dgl(width=-1e400)"):
        with pytest.raises(UserError):
            expr.build(text)


# ------------------------------------------------------------------------ shard contents
def test_odd_sized_images_are_resized_and_counted(tmp_path):
    data = synthetic_cifar(tmp_path / "data", train=12, odd=2)
    train = cifar10_shards(data).train
    loader = make_loader(train, batch_size=4, train=True)
    with pytest.warns(CorruptDataWarning, match="resized 2 image"):
        shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(4, 3, 32, 32)] * 3
    assert train.skipped["resized"] == 2


def test_empty_and_truncated_shards_are_reported(tmp_path):
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "train-000000.tar", [])
    members = [m for i in range(6) for m in ((f"s{i}.png", _png(rng)), (f"s{i}.cls", b"1"))]
    write_shard(tmp_path / "train-000001.tar", members)
    data = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").write_bytes(data[:data.index(b"s3.png") + 600])
    with pytest.warns(CorruptDataWarning) as record:
        ds = ShardStream(str(tmp_path / "train-*.tar"), lambda x: x.float(), limit=100)
        assert len(ds.shards) == 1
        got = [y for _, y in ds]
    text = " ".join(str(w.message) for w in record)
    assert "train-000000.tar holds no samples" in text
    assert "held at least that many" in text  # the count is a lower bound
    assert "at least 1 sample: the samples after the damage cannot be counted" in text
    assert len(got) == 3


# ---------------------------------------------------------------------------- pipe: URLs
def test_pipe_urls_are_opt_in_and_paths_are_never_urls(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 16), ("val", 8)):
        members = [m for i in range(n) for m in ((f"{split}{i}.png", _png(rng)),
                                                 (f"{split}{i}.cls", b"%d" % (i % 10)))]
        write_shard(src / f"{split}-000000.tar", members)
    marker = tmp_path / "HACKED"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "image_size": 32, "num_classes": 10,
        "train": {"urls": f"pipe:touch {marker}; cat {src}/train-000000.tar", "samples": 16},
        "val": {"urls": [str(src / "val-000000.tar")], "samples": 8}}))
    args = ["fit", "--rule", "dgl", "--k", "2", "--dataset", "imagenet-shards", "--data-dir",
            str(data), "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "r1")]) == 2
    assert "would run a shell command" in one_line(capsys.readouterr().err)
    assert not marker.exists()
    # webdataset's own refusal (WDS_SECURE=1) is one line too
    from webdataset import utils as wds_utils

    monkeypatch.setattr(wds_utils, "enforce_security", True)
    assert main([*args, "--allow-pipe", "--output-dir", str(tmp_path / "r2")]) == 2
    assert "webdataset refuses shard URL" in one_line(capsys.readouterr().err)
    monkeypatch.setattr(wds_utils, "enforce_security", False)
    assert main([*args, "--allow-pipe", "--output-dir", str(tmp_path / "r3")]) == 0
    assert marker.exists()  # asked for: the command ran
    marker.unlink()
    with pipes_allowed(False), pytest.raises(UserError, match="would run a shell command"):
        ShardStream(f"pipe:cat {src}/train-000000.tar", lambda x: x)

    # a data folder whose (relative) name starts with pipe: is a folder, not a command
    monkeypatch.chdir(tmp_path)
    folder = Path(f"pipe:touch {marker.name};cat x")
    synthetic_cifar(tmp_path / folder, train=16)
    code = main(["fit", "--rule", "dgl", "--k", "2", "--dataset", "cifar10-shards",
                 "--data-dir", str(folder), "--batch-size", "8", "--epochs", "1",
                 "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "r4")])
    assert code == 0, capsys.readouterr().err
    assert not marker.exists()


# ----------------------------------------------------------------------------- SIGTERM
def _signal_at(trainer: Trainer, step: int, times: int = 1) -> None:
    """Send this process SIGTERM (``times`` times) during step ``step + 1``'s rule step."""
    inner = trainer.rule.train_step

    def train_step(ctx, net, images, targets):
        if trainer.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return inner(ctx, net, images, targets)

    trainer.rule.train_step = train_step


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, capsys,
                                                                    monkeypatch):
    from localearn.engine import TrainingInterrupted

    def trainer(out, **kw):  # 64 digits in batches of 16: 4 steps an epoch, 8 in all
        return Trainer(tiny_cfg(tmp_path / out, epochs=2, batch_size=16, checkpoint_every=3,
                                seed=2, **kw))

    reference = trainer("full")
    reference.fit()
    victim = trainer("cut")
    _signal_at(victim, 4)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as exc:
        victim.fit()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    step5 = checkpoint.step_path(tmp_path / "cut", 5)
    assert exc.value.exit_code == 143
    assert exc.value.message == (f"stopped by SIGTERM at step 5 (epoch 2, batch 1 of 4); "
                                 f"checkpoint {step5}; continue with: localearn fit --resume "
                                 f"{step5}")
    assert "SIGTERM: finishing the current step" in capsys.readouterr().err
    resumed = trainer("cut", resume="latest")
    assert resumed.fit().step == 8
    a, b = reference.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a second signal stops at once, without a checkpoint of the unfinished step (one within
    # REPEAT_S of the first is the same request delivered twice: set to 0 to send two here)
    from localearn.engine.signals import StopSignals

    monkeypatch.setattr(StopSignals, "REPEAT_S", 0.0)
    twice = trainer("twice")
    _signal_at(twice, 4, times=2)
    with pytest.raises(TrainingInterrupted, match="stopped at once") as exc:
        twice.fit()
    assert exc.value.exit_code == 143
    assert checkpoint.list_checkpoints(tmp_path / "twice")[-1].name == "step-000000004.pt"


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    run = ["fit", "--rule", "dgl", "--k", "2", "--epochs", "4", "--train-limit", "64",
           "--test-limit", "32", "--batch-size", "16", "--checkpoint-every", "2", "--seed", "3",
           "--device", "cpu", "--no-progress"]
    full, killed = tmp_path / "full", tmp_path / "killed"

    def start(out):
        return subprocess.Popen([sys.executable, "-m", "localearn", *run, "--output-dir",
                                 str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV)

    reference, victim = start(full), start(killed)
    deadline = time.time() + 120
    while not checkpoint.list_checkpoints(killed):
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM at step" in last and "localearn fit --resume" in last, err
    resume_from = Path(last.rsplit("--resume ", 1)[1])
    assert resume_from.is_file() and not (killed / "checkpoint.pt").exists()
    r = subprocess.run([sys.executable, "-m", "localearn", "fit", "--resume", str(resume_from),
                        "--no-progress"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    reference.communicate(timeout=300)
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    for part in ("model", "aux"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


# ------------------------------------------------- exact resume on the real CIFAR-10 shards
def real_cifar(root: Path, src: Path, sizes: list[int], test: int = 32,
               corrupt: int | None = None) -> Path:
    """A cifar10-shards folder of real CIFAR-10 samples (from the shared shards): train shards
    of ``sizes`` samples, one test shard; sample ``corrupt`` (if given) made undecodable."""
    need = sum(sizes) + test
    samples: list[tuple[str, bytes, bytes]] = []
    current: dict[str, bytes] = {}
    with tarfile.open(src / "cifar10-train-000000.tar.gz", "r|gz") as tar:
        for member in tar:
            key, ext = member.name.rsplit(".", 1)
            current[ext] = tar.extractfile(member).read()
            if "jpg" in current and "cls" in current:
                samples.append((key, current["jpg"], current["cls"]))
                current = {}
                if len(samples) == need:
                    break
    root.mkdir(parents=True)
    start = 0
    for s, n in enumerate([*sizes, test]):
        split, index = ("test", 0) if s == len(sizes) else ("train", s)
        members = []
        for i, (key, jpg, cls) in enumerate(samples[start:start + n], start=start):
            members += [(f"{key}.jpg", b"\xff\xd8 broken" if i == corrupt else jpg),
                        (f"{key}.cls", cls)]
        write_shard(root / f"cifar10-{split}-{index:06d}.tar", members)
        start += n
    return root


def test_streams_deliver_the_planned_batches_with_workers(cifar_shards, tmp_path):
    """Each worker's last partial batch is joined to the others' (drop_last acted per worker:
    3 shards of 95 over 2 workers gave 7 batches of 32, not 8)."""
    data = real_cifar(tmp_path / "data", cifar_shards, [95, 95, 95])
    train = cifar10_shards(data, seed=1).train
    loader = make_loader(train, batch_size=32, train=True, workers=2)
    assert len(loader) == 8
    for epoch in (1, 2):
        train.set_epoch(epoch)
        sizes = [len(y) for _, y in loader]
        assert sizes == [32] * 8


def test_real_shards_with_10000_images_deliver_39_batches(cifar_shards):
    """The issue's case: 10,000 images, batch 256, 2 workers planned 39 batches, delivered 38."""
    train = cifar10_shards(cifar_shards, train_limit=10_000).train
    loader = make_loader(train, batch_size=256, train=True, workers=2)
    assert len(loader) == 39 and sum(1 for _ in loader) == 39


def _trainer(data: Path, out: Path, **extra) -> Trainer:
    return Trainer(make_config(rule="dgl", k=2, dataset="cifar10-shards", data_dir=data,
                               batch_size=32, epochs=2, checkpoint_every=3, workers=2,
                               seed=4, device="cpu", progress=False, output_dir=out, **extra))


def _cut_at(trainer: Trainer, step: int) -> None:
    inner = trainer.rule.train_step

    def train_step(ctx, net, images, targets):
        if trainer.step == step:
            raise KeyboardInterrupt
        return inner(ctx, net, images, targets)

    trainer.rule.train_step = train_step


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [None, 100], ids=["clean", "corrupt-sample"])
def test_resume_on_real_shards_is_exact(cifar_shards, tmp_path, corrupt):
    """Multi-shard, two workers, resumed mid-epoch and at an epoch boundary; with a corrupt
    sample the epoch delivers 8 of 9 planned batches, and the resumed run must count the same
    steps and follow the same re-planned schedule."""
    sizes = [96, 96, 96] if corrupt is not None else [95, 95, 95]
    data = real_cifar(tmp_path / "data", cifar_shards, sizes, corrupt=corrupt)
    with pytest.warns(CorruptDataWarning) if corrupt is not None else nullcontext():
        full = _trainer(data, tmp_path / "full")
        reference = full.fit()
    per_epoch = reference.step // 2
    expected = {"model": full.net.state_dict(), "aux": full.aux.state_dict()}
    for name, cut in (("mid", 4), ("boundary", per_epoch)):  # resumed from steps 3 and 8
        out = tmp_path / name
        victim = _trainer(data, out)
        _cut_at(victim, cut)
        with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptDataWarning)
            victim.fit()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptDataWarning)
            resumed = _trainer(data, out, resume="latest")
            result = resumed.fit()
        assert result.step == reference.step
        for part, module in (("model", resumed.net), ("aux", resumed.aux)):
            got = module.state_dict()
            unequal = [k for k in got if not torch.equal(got[k], expected[part][k])]
            assert not unequal, (name, part, unequal[:3])
        assert [r["train_loss"] for r in result.history] == \
            [r["train_loss"] for r in reference.history]
        assert [r["lr"] for r in result.history] == [r["lr"] for r in reference.history]
    assert per_epoch == 8  # 285 or 287 usable samples: 8 full batches of 32 each epoch
    assert [(r["batches"], r["planned_batches"]) for r in reference.history] == \
        [(8, 8)] * 2 if corrupt is None else [(8, 9)] * 2
    assert full.total_steps == reference.step  # the schedule was planned from what came
