"""A validation set held out of the training set (``--val-split``): the same images for every
seed, disjoint from training, seen with the test transform; the best epoch (``best.pt``, the
summary) is chosen on it instead of on the test set; a bad value is one line."""

from __future__ import annotations

import json

import pytest
import torch
from test_webdata import labels_of, shard_dir  # noqa: F401  (the fixture)

from localearn.cli import main
from localearn.config import FitConfig
from localearn.data.datasets import digits, imagenet_shards
from localearn.data.holdout import held_out_count, hold_out, transform_of
from localearn.engine.checkpoint import DATA_LAYOUT, SavedRun
from localearn.engine.report import best_of, selected_on
from localearn.errors import UserError

TINY = ["--rule", "dgl", "--k", "2", "--train-limit", "96", "--test-limit", "32",
        "--batch-size", "32", "--device", "cpu", "--no-progress"]


def indices(split) -> list[int]:
    return list(split.indices)


def test_a_count_or_a_share_of_the_training_set():
    assert held_out_count(100, 1000) == 100
    assert held_out_count(0.1, 1000) == 100
    assert held_out_count(0.25, 10) == 2  # rounded, not truncated to 0 or to the floor of 3
    for bad in (1000, 5000, 0.0001):
        with pytest.raises(UserError, match="valid: at least 1 image and fewer than all"):
            held_out_count(bad, 1000)


def test_the_same_images_for_every_seed_and_disjoint_from_training():
    held = []
    for seed in (0, 1, 7):
        data = hold_out(digits(seed=seed), 0.2)
        train, val = indices(data.train), indices(data.val)
        n = len(data.train.dataset)
        assert len(val) == round(0.2 * n) and len(train) + len(val) == n
        assert not set(train) & set(val) and sorted(train + val) == list(range(n))
        held.append((val, data.val_digest))
    assert held[0] == held[1] == held[2]
    other = hold_out(digits(), 0.3)
    assert other.val_digest != held[0][1]


def test_validation_images_go_through_the_test_transform():
    data = digits()
    split = hold_out(data, 50)
    assert transform_of(split.val) is transform_of(data.test)
    assert transform_of(split.train) is transform_of(data.train)
    i = split.val.indices[0]
    x, y = split.val[0]
    torch.testing.assert_close(x, transform_of(data.test)(data.train.images[i]))
    assert y == data.train[i][1]


def test_a_stream_of_shards_splits_by_key_disjointly(shard_dir):  # noqa: F811
    data = imagenet_shards(shard_dir)
    n = len(data.train)
    split = hold_out(data, 0.25)
    train, val = labels_of(split.train), labels_of(split.val)
    assert not set(train) & set(val) and sorted(train + val) == list(range(n))
    assert abs(len(val) - n / 4) < 4 * (n * 0.25 * 0.75) ** 0.5  # a share, up to sampling noise
    assert labels_of(hold_out(imagenet_shards(shard_dir), 0.25).val) == val  # deterministic
    split.train.set_epoch(3)
    assert sorted(labels_of(split.train)) == sorted(train)  # reshuffled, never the val images


def test_the_best_epoch_is_chosen_on_validation_when_there_is_one():
    rows = [{"epoch": 1, "test_acc": 0.9, "val_acc": 0.5},
            {"epoch": 2, "test_acc": 0.6, "val_acc": 0.8},
            {"epoch": 3, "test_acc": 0.7, "val_acc": 0.8}]
    assert best_of(rows) == (0.6, 2) and selected_on(rows) == "validation"
    plain = [{k: v for k, v in r.items() if k != "val_acc"} for r in rows]
    assert best_of(plain) == (0.9, 1) and selected_on(plain) == "test"


def test_fit_with_a_validation_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", *TINY, "--epochs", "3", "--val-split", "0.25", "--out", str(out)]) == 0
    text = capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"val_acc"' in line]
    vals = [r["val_acc"] for r in hist]
    assert len(vals) == 3 and s["best_selected_on"] == "validation" and s["val_images"] == 24
    best = 1 + max(range(3), key=lambda i: (vals[i], -i))
    assert s["best_epoch"] == best and s["best_val_acc"] == vals[best - 1]
    assert s["best_test_acc"] == hist[best - 1]["test_acc"] and s["last_val_acc"] == vals[-1]
    assert SavedRun.open(out / "best.pt").state["epoch"] == best
    assert "24 training images held out for validation" in text.err + text.out
    assert "at the best validation epoch" in text.err + text.out


def test_the_split_is_part_of_the_data_layout_and_bad_values_are_one_line(capsys):
    assert "val_split" in DATA_LAYOUT  # resuming mid-epoch with another split is refused
    with pytest.raises(ValueError, match="neither a count of images"):
        FitConfig(val_split=1.5)
    for value, words in (("1.5", "neither a count of images"), ("-1", "greater than 0"),
                         ("5000", "valid: at least 1 image")):
        assert main(["fit", *TINY, "--epochs", "1", "--val-split", value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err
