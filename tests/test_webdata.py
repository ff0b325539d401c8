"""Streaming WebDataset shards: ranks, workers, shuffling, limits, URLs, corrupt data, CLI."""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localearn.cli import main
from localearn.data import imagenet_shards, imagenet_transforms, make_loader
from localearn.data.webdata import CorruptDataWarning, ShardStream, count_samples
from localearn.errors import UserError

PER_SHARD = 40


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    """A random-size (64..224 px a side) smooth colour image, encoded."""
    h, w = (int(v) for v in rng.integers(64, 225, size=2))
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample(key: str, label: int, rng: np.random.Generator, ext: str = "jpg") -> list:
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}[ext]
    return [(f"{key}.{ext}", image_bytes(rng, fmt)), (f"{key}.cls", str(label).encode())]


def make_split(root: Path, split: str, shards: int, first_label: int, seed: int = 0,
               gz_last: bool = False) -> list[int]:
    """``shards`` shards of PER_SHARD samples with distinct labels; returns them in order."""
    rng = np.random.default_rng(seed)
    labels = []
    for s in range(shards):
        members = []
        for i in range(PER_SHARD):
            label = first_label + s * PER_SHARD + i
            ext = ("jpg", "jpeg", "png")[i % 3]
            members += sample(f"{split}{s:02d}_{i:04d}", label, rng, ext)
            labels.append(label)
        suffix = ".tar.gz" if gz_last and s == shards - 1 else ".tar"
        write_shard(root / f"{split}-{s:06d}{suffix}", members)
    return labels


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """4 train shards (the last gzipped) and 2 val shards, labels 0..239, 64x64 crops."""
    root = tmp_path_factory.mktemp("imagenet")
    make_split(root, "train", 4, 0, gz_last=True)
    make_split(root, "val", 2, 700, seed=1)
    (root / "manifest.json").write_text(json.dumps({"image_size": 64}))
    return root


def labels_of(ds, workers: int = 0, batch_size: int = 16) -> list[int]:
    """Every label one epoch yields (a plain DataLoader: keeps the rank set on ``ds``)."""
    out: list[int] = []
    for _, y in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers):
        out += y.tolist()
    return out


def identity_stream(root: Path, **kw) -> ShardStream:
    tf = imagenet_transforms(32)[1]
    return ShardStream(str(root / "train-{000000..000003}.tar*"), tf, **kw)


def test_every_sample_once_per_epoch_with_two_workers(shard_dir):
    ds = imagenet_shards(shard_dir).train
    assert len(ds) == 4 * PER_SHARD
    first = labels_of(ds, workers=2)
    assert sorted(first) == list(range(4 * PER_SHARD))
    ds.set_epoch(2)
    second = labels_of(ds, workers=2)
    assert sorted(second) == sorted(first) and second != first  # reshuffled, same samples


def test_ranks_split_the_shards(shard_dir):
    seen = []
    for rank in (0, 1):
        ds = identity_stream(shard_dir, train=True, resample=False)  # finite: a partition
        ds.set_rank(rank, 2)
        assert not ds.resampled()
        got = labels_of(ds, workers=2)
        assert len(got) == len(ds) == 2 * PER_SHARD
        seen += got
    assert sorted(seen) == list(range(4 * PER_SHARD))


def test_resampled_stream_has_the_stated_epoch_length(shard_dir):
    ds = identity_stream(shard_dir, train=True, samples=4 * PER_SHARD)
    loader = make_loader(ds, batch_size=8, train=True, workers=2, rank=1, world_size=3)
    assert ds.resampled() and len(ds) == 4 * PER_SHARD // 3
    n = sum(len(y) for _, y in loader)  # each worker drops its own last partial batch
    assert len(ds) - 2 * 7 <= n <= len(ds)
    assert len(labels_of(ds, workers=2, batch_size=1)) == len(ds)


def test_limit_keeps_the_first_samples_in_shard_order(shard_dir):
    ds = identity_stream(shard_dir, limit=PER_SHARD + 10, samples=4 * PER_SHARD)
    assert len(ds) == PER_SHARD + 10
    assert labels_of(ds) == list(range(PER_SHARD + 10))


def test_brace_pipe_and_gzip_urls(shard_dir):
    tf = imagenet_transforms(32)[1]
    assert count_samples(str(shard_dir / "train-000003.tar.gz")) == PER_SHARD
    urls = [f"pipe:cat {shard_dir}/train-{{000000..000002}}.tar",
            str(shard_dir / "train-000003.tar.gz")]
    ds = ShardStream(urls, tf)
    assert len(ds.urls) == 4 and len(ds) == 4 * PER_SHARD
    assert labels_of(ds, workers=2) == labels_of(identity_stream(shard_dir), workers=2)


def test_manifest_names_urls_counts_and_classes(shard_dir, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "train": {"urls": f"pipe:cat {shard_dir}/train-{{000000..000002}}.tar",
                  "samples": 3 * PER_SHARD},
        "val": {"urls": [str(shard_dir / "val-000000.tar")], "samples": PER_SHARD},
        "classes": [f"c{i}" for i in range(900)], "image_size": 48}))
    data = imagenet_shards(tmp_path)
    assert data.info.num_classes == 900 and data.info.input_shape == (3, 48, 48)
    assert len(data.train) == 3 * PER_SHARD and len(data.test) == PER_SHARD
    x, y = next(iter(data.test))
    assert x.shape == (3, 48, 48) and y == 700
    assert sorted(labels_of(data.train)) == list(range(3 * PER_SHARD))


def test_transforms_give_fixed_size_normalised_tensors(shard_dir):
    train_tf, test_tf = imagenet_transforms(64)
    img = torch.full((3, 100, 180), 255, dtype=torch.uint8)  # decoded images are uint8 CHW
    assert train_tf(img).shape == test_tf(img).shape == (3, 64, 64)
    assert torch.allclose(test_tf(img)[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406]))
                          / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)
    train_tf, test_tf = imagenet_transforms()
    assert test_tf.transforms[0].size == [256] and train_tf(img).shape == (3, 224, 224)


def corrupt_dir(root: Path) -> tuple[Path, int]:
    """Train shards: two good ones, one with a truncated member and one with bad members;
    returns the folder and the number of usable train samples."""
    rng = np.random.default_rng(3)
    good = make_split(root, "train", 2, 0)
    # shard 2: 10 samples; the file is cut inside sample 6's image, so 0..5 are read
    members = [m for i in range(10) for m in sample(f"t{i:02d}", 100 + i, rng)]
    write_shard(root / "train-000002.tar", members)
    data = (root / "train-000002.tar").read_bytes()
    cut = data.index(b"t06.jpg") + 512 + 100  # header, then 100 bytes of the image
    (root / "train-000002.tar").write_bytes(data[:cut])
    # shard 3: text under .jpg, a cut JPEG, no label, a label out of range, 2 good samples
    jpeg = image_bytes(rng)
    members = [("b0.jpg", b"not an image at all"), ("b0.cls", b"5"),
               ("b1.jpg", jpeg[: len(jpeg) // 3]), ("b1.cls", b"6"),
               ("b2.jpg", jpeg),
               ("b3.jpg", jpeg), ("b3.cls", b"1000"),
               *sample("b4", 7, rng), *sample("b5", 8, rng)]
    write_shard(root / "train-000003.tar", members)
    make_split(root, "val", 1, 500, seed=4)
    (root / "manifest.json").write_text(json.dumps({"image_size": 32}))
    return root, len(good) + 6 + 2


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path):
    root, usable = corrupt_dir(tmp_path)
    with pytest.warns(CorruptDataWarning, match="damaged .* counting 7 samples"):
        ds = imagenet_shards(root).train  # the count stops at the cut, in t06's image
    assert len(ds) == 2 * PER_SHARD + 7 + 6
    with pytest.warns(CorruptDataWarning) as record:
        got = labels_of(ds)
    assert len(got) == usable and 105 in got and 106 not in got and 8 in got
    stats = ds.skipped
    # 4 bad samples in shard 3; in shard 2, t06 is lost at the cut (t07..t09 are gone
    # without trace: no tar header of theirs survives)
    assert stats["samples"] == 4 and stats["shards"] == 1 and stats["lost"] == 1
    assert stats["delivered"] == usable
    text = " ".join(str(w.message) for w in record)
    assert "train-000002.tar is unreadable after 6 samples" in text
    assert all(f"'b{i}'" in text for i in range(4))
    with pytest.warns(CorruptDataWarning, match="5 in total"):
        ds.set_epoch(2)


def test_fit_runs_on_corrupt_shards_and_reports_skips(tmp_path, capfd):
    (tmp_path / "data").mkdir()
    root, _ = corrupt_dir(tmp_path / "data")
    with pytest.warns(CorruptDataWarning) as record:  # the main process: counting, totals
        code = main(["fit", "--rule", "dgl", "--model", "resnet32", "--k", "4", "--dataset",
                     "imagenet-shards", "--data-dir", str(root), "--epochs", "2",
                     "--batch-size", "8", "--workers", "2", "--device", "cpu",
                     "--no-progress", "--output-dir", str(tmp_path / "run")])
    assert any("5 in total" in str(w.message) for w in record)  # reported at epoch 2
    err = capfd.readouterr().err
    assert code == 0, err
    assert err.count("unreadable after 6 samples") == 2  # once per epoch
    # each worker sums up its epoch: 4 undecodable samples per epoch in all
    assert sum(int(n) for n in re.findall(r"skipped (\d+) undecodable", err)) == 8
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2


@pytest.mark.slow
def test_cli_resnet34_k17_end_to_end(shard_dir, tmp_path):
    out = tmp_path / "run"
    code = main(["fit", "--rule", "dgl", "--model", "resnet34", "--k", "17", "--dataset",
                 "imagenet-shards", "--data-dir", str(shard_dir), "--train-limit", "64",
                 "--epochs", "1", "--batch-size", "8", "--workers", "2", "--device", "cpu",
                 "--no-progress", "--output-dir", str(out)])
    assert code == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["local_losses"]) == 16
    assert 0.0 <= rows[0]["test_acc"] <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["model"]["local_modules.16.1.1.weight"].shape == (1000, 512)
    (out / "checkpoint.pt").unlink()  # 0.6 GB: do not leave it in pytest's kept tmp dirs


def test_missing_or_bad_shards_are_one_line_errors(tmp_path, capsys):
    assert main(["fit", "--dataset", "imagenet-shards", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no train shards" in err
    (tmp_path / "manifest.json").write_text('{"train": {"urls": "x-{0..3}.tar"}}')
    with pytest.raises(UserError, match="does not exist"):
        imagenet_shards(tmp_path)
    (tmp_path / "manifest.json").write_text('{"image_size": -3}')
    with pytest.raises(UserError, match="image_size must be a positive integer"):
        imagenet_shards(tmp_path)


def test_pipe_that_fails_is_counted_not_fatal(shard_dir):
    tf = imagenet_transforms(32)[1]
    ds = ShardStream([str(shard_dir / "train-000000.tar"), "pipe:cat /nonexistent/x.tar"],
                     tf, samples=2 * PER_SHARD)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = labels_of(ds)
    assert got == list(range(PER_SHARD)) and ds.skipped["shards"] == 1
    assert any("nonexistent" in str(w.message) for w in record)
