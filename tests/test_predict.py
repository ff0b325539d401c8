"""``localearn predict RUN IMAGES...``: image files classified with the run's own input size,
normalisation and class names; a bad file is one line and the others are still classified."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from localearn.analysis.runs import load_run
from localearn.cli import main
from localearn.data.datasets import DIGIT_CLASSES, digits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from localearn.config import make_config
    from localearn.engine import fit

    out = tmp_path_factory.mktemp("predict") / "run"
    fit(make_config(rule="dgl", k=2, epochs=1, train_limit=128, test_limit=32, batch_size=32,
                    lr=0.05, device="cpu", progress=False, output_dir=out))
    return out


def test_predict_prints_top_classes_of_image_files(run, tmp_path, capsys):
    test = digits(train_limit=128, test_limit=3).test  # normalised as the run was
    files = []
    for i in range(3):  # the stored uint8 test images, before normalisation, as PNG files
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    # what the network says on the dataset's own tensors: predict must agree
    net = load_run(run).net
    with torch.no_grad():
        expected = torch.softmax(net(torch.stack([test[i][0] for i in range(3)])), 1)
    assert main(["predict", str(run), *map(str, files), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for path, line, probs in zip(files, lines, expected):
        best = int(probs.argmax())
        assert line.startswith(f"{path}: {DIGIT_CLASSES[best]} {float(probs[best]):.2%}, ")
        assert line.count("%") == 2
    # JSON on stdout: the same, with probabilities
    assert main(["predict", str(run), str(files[0]), "--top", "10", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert [t["class"] for t in row["top"]][0] == DIGIT_CLASSES[int(expected[0].argmax())]
    assert sum(t["probability"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)


def test_bad_files_are_one_line_each(run, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (50, 20), (200, 10, 10)).save(good)  # any size: resized to 32x32
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    assert main(["predict", str(run), str(text), str(good), str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: ") and out.count("\n") == 1
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith(f"localearn: error: {text}: not a readable image")
    assert lines[1] == f"localearn: error: {missing}: no such file"
    assert main(["predict", str(run), str(good), "--top", "0"]) == 2
    assert "--top must be at least 1" in capsys.readouterr().err
