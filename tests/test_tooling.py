"""Reproduction tooling: ``localearn data cifar10-shards`` round-trips real images, and
``localearn table`` runs presets over seeds, resumably."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localearn.cli import main
from localearn.cli.table import spread
from localearn.data.datasets import cifar10_shards
from localearn.data.webdata import ShardStream

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
           b"ship", b"truck"]
#: JPEG at quality 95 on 32x32 images: the mean absolute pixel error stays well under this
#: (measured 0.81 of 255 on these real CIFAR-10 images, the largest error 33), no pixel
#: moves by more than MAX_ERR
MEAN_ERR, MAX_ERR = 3.0, 64


def real_images(shards: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images (N, 32, 32, 3) and labels of a real CIFAR-10 test shard."""
    images, labels, pending = [], [], {}
    with tarfile.open(shards / "cifar10-test-000000.tar.gz", "r|*") as tar:
        for member in tar:
            key, ext = member.name.rsplit(".", 1)
            pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
            if len(pending[key]) == 2:
                sample = pending.pop(key)
                images.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
                labels.append(int(sample["cls"]))
                if len(images) == n:
                    break
    return np.stack(images), np.array(labels)


def fake_batches(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """torchvision's cifar-10-batches-py layout: 5 train batches and a test batch of pickled
    dicts (rows of 3072 bytes, channel-major), and batches.meta."""
    folder.mkdir(parents=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    parts = {f"data_batch_{i}": slice(3 * (i - 1), 3 * i) for i in range(1, 6)}
    parts["test_batch"] = slice(15, len(images))
    for name, part in parts.items():
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows[part], b"labels": labels[part].tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": CLASSES}, f)


def test_cifar10_shards_round_trip_real_images(cifar_shards, tmp_path, capsys):
    images, labels = real_images(cifar_shards, 21)  # 15 train (5 batches of 3), 6 test
    fake_batches(tmp_path / "src" / "cifar-10-batches-py", images, labels)
    out = tmp_path / "shards"
    assert main(["data", "cifar10-shards", "--from", str(tmp_path / "src"), "--out", str(out),
                 "--shard-size", "4"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"cifar10-test-00000{i}.tar.gz" for i in range(2)] + \
        [f"cifar10-train-00000{i}.tar.gz" for i in range(4)] + ["manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"train": {"samples": 15, "shards": 4}, "test": {"samples": 6, "shards": 2},
                        "classes": [c.decode() for c in CLASSES]}
    # read back with the project's loader: the dataset factory, then the raw uint8 images
    data = cifar10_shards(out)
    assert len(data.train) == 15 and len(data.test) == 6
    for split, part in (("train", slice(0, 15)), ("test", slice(15, 21))):
        urls = sorted(out.glob(f"cifar10-{split}-*.tar.gz"))
        got = list(ShardStream(urls, lambda x: x, num_classes=10))  # shard order, no shuffle
        pixels = np.stack([x.permute(1, 2, 0).numpy() for x, _ in got]).astype(int)
        assert [y for _, y in got] == labels[part].tolist()
        err = np.abs(pixels - images[part].astype(int))
        assert err.mean() < MEAN_ERR and err.max() <= MAX_ERR, (err.mean(), err.max())
    # the normalised test images the network sees are the same pictures
    x, y = next(iter(data.test))
    back = data.info.denormalize(x[None])[0].permute(1, 2, 0).numpy() * 255
    assert y == labels[15] and np.abs(back - images[15]).mean() < MEAN_ERR
    # a second run refuses to replace the shards, in one line
    capsys.readouterr()
    assert main(["data", "cifar10-shards", "--from", str(tmp_path / "src"), "--out",
                 str(out)]) == 2
    assert "holds CIFAR-10 shards already" in capsys.readouterr().err


def test_cifar10_shards_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert main(["data", "cifar10-shards", "--from", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing data_batch_1" in err


# ------------------------------------------------------------------------------- table
def test_spread_is_mean_and_sample_std_in_percent():
    # mean 0.6; sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert spread([0.5, 0.7]) == "60.00 ± 14.14"
    assert spread([0.25]) == "25.00 ± 0.00"


PRESET = """rule = "{rule}"
model = "resnet32"
k = {k}
dataset = "digits"
epochs = 2
batch_size = 32
lr = 0.05
train_limit = 64
test_limit = 32
"""


def test_table_runs_presets_over_seeds_and_resumes_after_an_interruption(tmp_path, capsys):
    presets = tmp_path / "presets"
    (presets / "a").mkdir(parents=True)
    (presets / "a" / "dgl.toml").write_text(PRESET.format(rule="dgl", k=2))  # runs first
    (presets / "bp.toml").write_text(PRESET.format(rule="bp", k=1))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "localearn", "table", str(presets), "--seeds", "0,1", "--out",
           str(out), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # interrupt the first run during its second (last) epoch, as Ctrl-C does
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 1/2"):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, "".join(seen)
    run = out / "a" / "dgl" / "seed-0"
    assert not (run / "summary.json").exists() and any((run / "checkpoints").iterdir())
    # the same command again: the unfinished run resumed, the others trained
    capsys.readouterr()
    assert main(cmd[3:]) == 0
    text = capsys.readouterr().out
    for line in ("a/dgl seed 0: resumed", "a/dgl seed 1: trained", "bp seed 0: trained"):
        assert line in text
    epochs = [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    # one markdown row per preset: the mean and sample std of what each run's summary says
    for name, rule in (("a/dgl", "dgl"), ("bp", "bp")):
        accs = [json.loads((out / name / f"seed-{s}" / "summary.json").read_text())
                for s in (0, 1)]
        last = spread([a["last_test_acc"] for a in accs])
        best = spread([a["best_test_acc"] for a in accs])
        assert f"| {name} | `{rule}` | resnet32 | digits | 0,1 | {last} | {best} |" in text
        assert json.loads((out / name / "seeds.json").read_text())["seeds"] == [0, 1]
    table = (out / "table.md").read_text()
    assert table in text
    # once more: every run is finished, read back and left untouched; the same table
    summaries = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert len(summaries) == 4
    assert main(cmd[3:]) == 0
    assert capsys.readouterr().out.count(": finished, last") == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == summaries
    assert (out / "table.md").read_text() == table
    # other settings into the same folder are refused, not mixed into the table
    assert main([*cmd[3:], "--epochs", "3"]) == 2
    assert "holds a run made with other settings (epochs 2, now 3)" in capsys.readouterr().err


def test_table_refuses_a_file_that_is_not_a_training_preset(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "mem.toml").write_text("[memory]\nrule = 'dgl'\n")
    assert main(["table", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preset" in err and "mem.toml" in err


def test_table_runs_a_shipped_preset_cheaply_with_overrides(tmp_path, capsys):
    """A shipped 400-epoch CIFAR-10 preset, run for one short epoch on the embedded digits:
    --dataset, --epochs and --set reach the run's settings."""
    import shutil

    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(ROOT / "examples" / "configs" / "table1" / "cifar10" / "dgl-resnet32.toml",
                presets)
    out = tmp_path / "out"
    argv = ["table", str(presets), "--seeds", "0", "--out", str(out), "--no-progress",
            "--dataset", "digits", "--epochs", "1", "--train-limit", "64",
            "--test-limit", "32", "--batch-size", "32", "--workers", "0", "--set", "lr=0.05",
            "--set", "k=4", "--set", "nesterov=false"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "dgl-resnet32 seed 0: trained" in capsys.readouterr().out
    cfg = json.loads((out / "dgl-resnet32" / "seed-0" / "config.json").read_text())
    assert (cfg["dataset"], cfg["epochs"], cfg["lr"], cfg["k"], cfg["nesterov"]) == \
        ("digits", 1, 0.05, 4, False)
    assert cfg["momentum"] == 0.9 and cfg["batch_size"] == 32  # the rest as the preset says


def test_table_epochs_keep_the_presets_warmup_share(tmp_path):
    from localearn.cli.table import preset_settings

    preset = tmp_path / "long.toml"
    preset.write_text('rule = "dgl"\nepochs = 400\nwarmup_epochs = 10\n')
    assert preset_settings(preset, {"epochs": 2}) == {"epochs": 2, "warmup_epochs": 0.05}
    assert preset_settings(preset, {"epochs": 2, "warmup_epochs": 0.5})["warmup_epochs"] == 0.5
    plain = tmp_path / "plain.toml"  # no warm-up in the preset: its default share, untouched
    plain.write_text('rule = "dgl"\nepochs = 400\n')
    assert preset_settings(plain, {"epochs": 2}) == {"epochs": 2}


@pytest.mark.parametrize("setting, message", [
    ("lr", "expected KEY=VALUE"),
    ("learning_rate=0.1", "unknown setting 'learning_rate'; valid: rule, "),
    ("lr=fast", "invalid lr"),
    ("epochs=0", "invalid epochs"),
])
def test_table_set_is_validated_in_one_line(tmp_path, capsys, setting, message):
    presets = tmp_path / "p"
    presets.mkdir()
    (presets / "dgl.toml").write_text(PRESET.format(rule="dgl", k=2))
    assert main(["table", str(presets), "--out", str(tmp_path / "o"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o" / "dgl").exists()  # refused before any run


@pytest.mark.parametrize("seeds", ["0,x", "1,1", ""])
def test_table_checks_seeds(tmp_path, capsys, seeds):
    assert main(["table", str(ROOT / "examples" / "configs"), "--seeds", seeds]) == 2
    assert "--seeds" in capsys.readouterr().err


# ------------------------------------------------------- profiler: private path, fallback
def peak_phases_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mlaan_peak_phases", ROOT / "examples" / "mlaan_peak_phases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profiled_phases():
    """A profiled piece of work whose peak (16 MB live: two 8 MB tensors) falls in the phase
    'big', between two small phases."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("phase: small before"):
            a = torch.ones(1000)
        with record_function("phase: big"):
            b = torch.ones(2_000_000)
            c = b * 2
            del b, c
        with record_function("phase: small after"):
            d = a + 1
    del a, d
    return prof


class NoKineto:
    """A finished profile whose private Kineto results are gone (a torch release moved them);
    the public API still answers."""

    def __init__(self, prof):
        self.profiler = object()
        self.events = prof.events


def test_peak_phases_uses_the_profilers_private_results_while_they_work():
    example = peak_phases_example()
    memory, phases, source = example.timeline(profiled_phases())
    assert source == "kineto_results", (
        "torch's private profiler results (prof.profiler.kineto_results) no longer work: "
        "examples/mlaan_peak_phases.py now runs on its coarser public fallback "
        "(prof.events()); update kineto_timeline or drop it")
    peak, inside = example.peak_phase(memory, phases)
    assert 16_000_000 <= peak < 16_100_000 and inside == ["phase: big"]


def test_peak_phases_falls_back_to_the_public_events():
    example = peak_phases_example()
    memory, phases, source = example.timeline(NoKineto(profiled_phases()))
    assert source == "events"
    assert [name for _, _, name in phases] == ["phase: small before", "phase: big",
                                               "phase: small after"]
    peak, inside = example.peak_phase(memory, phases)
    assert 16_000_000 <= peak < 16_100_000 and inside == ["phase: big"]


def test_progress_bar_shows_in_notebooks_and_not_in_logs(monkeypatch):
    """The bar is tqdm.auto's (a widget in a notebook), on when a person watches: a terminal
    or a Jupyter kernel; off for a file or a pipe."""
    import io
    import sys
    import types

    import tqdm.auto

    from localearn.engine import loop

    assert loop.tqdm is tqdm.auto.tqdm
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log file
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not loop._is_terminal()

    class ZMQInteractiveShell:  # what get_ipython() returns in a Jupyter kernel
        pass

    class TerminalInteractiveShell:  # plain IPython in a terminal, output piped
        pass

    for shell, shown in ((ZMQInteractiveShell(), True), (TerminalInteractiveShell(), False),
                         (None, False)):
        fake = types.ModuleType("IPython")
        fake.get_ipython = lambda shell=shell: shell
        monkeypatch.setitem(sys.modules, "IPython", fake)
        assert loop._is_terminal() is shown

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    assert loop._is_terminal()
