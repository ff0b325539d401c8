"""``localearn plot``: accuracy-epoch curves of several runs to one PNG."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from localearn.cli import main
from localearn.runlog import RunLog


def _run(path, rule, accs):
    """A run folder as the engine writes it: config.json and one metrics row per epoch."""
    log = RunLog(path)
    log.start({"rule": rule, "model": "resnet32", "k": 4}, [], 0)
    for epoch, acc in enumerate(accs, start=1):
        log.epoch({"epoch": epoch, "step": 10 * epoch, "lr": 0.1, "train_loss": 1.0 / epoch,
                   "train_acc": acc, "local_losses": [0.5], "test_acc": acc})
    log.close()
    return path


def _has_colour(pixels: np.ndarray, hex_colour: str, tol: int = 40) -> bool:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(pixels[..., :3].astype(int) - rgb).max(-1) < tol).sum() > 50)


def test_plot_writes_one_png_with_both_runs(tmp_path, capsys):
    a = _run(tmp_path / "dgl", "dgl", [0.3, 0.6, 0.8, 0.9])
    b = _run(tmp_path / "mlaan", "mlaan(dgl)", [0.4, 0.7, 0.85, 0.93])
    out = tmp_path / "fig" / "acc.png"
    assert main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] > 300
    pixels = np.asarray(image.convert("RGB"))
    # matplotlib's first two line colours: one curve per run
    assert _has_colour(pixels, "#1f77b4") and _has_colour(pixels, "#ff7f0e")
    # one run only: no second colour
    single = tmp_path / "one.png"
    assert main(["plot", str(a), "-o", str(single)]) == 0
    assert not _has_colour(np.asarray(Image.open(single).convert("RGB")), "#ff7f0e")


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run folder" in err
    assert not (tmp_path / "x.png").exists()


def test_torn_last_metrics_line_is_ignored(tmp_path):
    run = _run(tmp_path / "r", "dgl", [0.5, 0.6])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "test_acc": 0.7})[:10])  # a writer killed mid-line
    assert main(["plot", str(run), "-o", str(tmp_path / "p.png")]) == 0


def test_plot_writes_into_the_run_folder_and_labels_keep_k(tmp_path, capsys, monkeypatch):
    from localearn.plot import run_label

    monkeypatch.chdir(tmp_path)
    run = _run(tmp_path / "r", "dgl", [0.5, 0.6])
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'test_acc.png'}\n"
    assert Image.open(run / "test_acc.png").format == "PNG"
    assert not (tmp_path / "accuracy.png").exists()  # nothing in the working directory
    assert main(["plot", str(run), "--metric", "train_loss"]) == 0
    assert (run / "train_loss.png").is_file()
    # K left to the rule (config k null): the label takes the K trained, from the summary
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "k": None}))
    assert run_label(run) == "dgl, resnet32"
    (run / "summary.json").write_text(json.dumps({"k": 16}))
    assert run_label(run) == "dgl, resnet32 K=16"
