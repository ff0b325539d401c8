"""SVHN and STL-10 from files in their real formats (written here, tiny), with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from localearn.cli import main
from localearn.config import make_config
from localearn.data import stl10, svhn
from localearn.engine import Trainer
from localearn.errors import UserError


def write_svhn(root: Path, n_train: int = 24, n_test: int = 12) -> dict[str, np.ndarray]:
    """torchvision's SVHN layout: X is (32, 32, 3, N) uint8, y is (N, 1) with 10 for '0'."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = x
    return out


def write_stl10(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """STL-10's binary layout: per image 3 planes of 96x96 bytes, column-major; labels 1..10."""
    rng = np.random.default_rng(1)
    folder = root / "stl10_binary"
    folder.mkdir()
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        out[split] = images
    return out


def raw(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.images, ds.labels


def test_svhn_reads_mat_files(tmp_path):
    arrays = write_svhn(tmp_path)
    data = svhn(tmp_path)
    images, labels = raw(data.train)
    assert images.shape == (24, 3, 32, 32) and images.dtype == torch.uint8
    # pixel (row h, column w, channel c) of image i stays where it was
    assert images[5, 2, 7, 19] == arrays["train"][7, 19, 2, 5]
    assert labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 10 is the digit 0
    assert data.info.num_classes == 10 and data.info.input_shape == (3, 32, 32)
    assert data.info.mean == data.info.std == (0.5, 0.5, 0.5)
    x, y = data.test[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 4
    # eval: just normalised; train: a padded crop, so values stay in [-1, 1]
    assert torch.allclose(x, torch.from_numpy(arrays["test"][:, :, :, 3]).permute(2, 0, 1)
                          .float() / 255 * 2 - 1, atol=1e-5)
    assert data.train[0][0].abs().max() <= 1.0
    limited = svhn(tmp_path, train_limit=7, test_limit=3)
    assert len(limited.train) == 7 and len(limited.test) == 3


def crops(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop of ``img`` zero-padded by ``pad``, and their mirror images."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img.float(), (pad,) * 4)
    out = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return out + [c.flip(-1) for c in out]


def augmented(tf, img: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` augmentations of a uint8 image, de-normalised (mean = std = 0.5) to 0..255."""
    return [((tf(img) * 0.5 + 0.5) * 255).round() for _ in range(n)]


def test_svhn_augmentation_is_pad2_crop_without_flip(tmp_path):
    write_svhn(tmp_path)
    data = svhn(tmp_path)
    img = data.train.images[0]
    options = crops(img, 2)
    plain, mirrored = options[:25], options[25:]
    torch.manual_seed(0)
    for out in augmented(data.train.transform, img, 60):
        assert any(torch.equal(out, c) for c in plain)
        assert not any(torch.equal(out, c) for c in mirrored)
    shifts = {next(i for i, c in enumerate(plain) if torch.equal(out, c))
              for out in augmented(data.train.transform, img, 60)}
    assert len(shifts) > 5  # the offset really is random


def test_stl10_reads_binary_files_and_has_ten_classes(tmp_path):
    arrays = write_stl10(tmp_path)
    data = stl10(tmp_path)
    images, labels = raw(data.train)
    assert images.shape == (20, 3, 96, 96)
    assert torch.equal(images, torch.from_numpy(arrays["train"]))
    assert labels.tolist() == [i % 10 for i in range(20)]  # stored 1..10
    assert data.info.num_classes == 10 and data.info.input_shape == (3, 96, 96)
    img = data.train.images[0]
    options = crops(img, 4)
    torch.manual_seed(0)
    seen = set()
    for out in augmented(data.train.transform, img, 40):  # a padded-by-4 crop, maybe mirrored
        seen.add(next(i for i, c in enumerate(options) if torch.equal(out, c)) >= 81)
    assert seen == {False, True}
    assert data.train[0][0].shape == data.test[0][0].shape == (3, 96, 96)


def test_missing_files_are_one_clear_line(tmp_path, capsys):
    for name in ("svhn", "stl10"):
        assert main(["fit", "--dataset", name, "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not found" in err and "--download" in err
    with pytest.raises(UserError, match="train_32x32.mat"):
        svhn(tmp_path)


def test_damaged_files_are_refused(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        svhn(tmp_path)
    write_stl10(tmp_path)
    with open(tmp_path / "stl10_binary" / "test_y.bin", "ab") as f:
        f.write(b"\x01")  # one label too many
    with pytest.raises(UserError, match="disagree"):
        stl10(tmp_path)


PRESETS = Path(__file__).resolve().parents[1] / "examples" / "configs" / "table1"


@pytest.mark.parametrize("dataset", ["svhn", "stl10"])
def test_the_dgl_row_trains_on_both_from_the_paper_preset(dataset, tmp_path):
    (write_svhn if dataset == "svhn" else write_stl10)(tmp_path)
    # the Table I preset, made small: K=4, one epoch, batch 8, no warm-up
    cfg = make_config(PRESETS / dataset / "dgl-resnet32.toml", k=4, data_dir=tmp_path,
                      epochs=1, batch_size=8, warmup_epochs=0, workers=0, progress=False,
                      device="cpu", output_dir=tmp_path / "run")
    # the public code's only DGL baseline: InfoPro's classifier head, no reconstruction term
    assert cfg.dataset == dataset
    assert cfg.rule == "infopro(loss=ce, ixx_1=0, ixx_2=0, ixy_1=1, ixy_2=1)"
    trainer = Trainer(cfg)
    fc = [m for m in trainer.net.local_modules[-1].modules() if isinstance(m, torch.nn.Linear)]
    assert fc[-1].out_features == 10  # never the 100-way classifier of the public code
    result = trainer.fit()
    assert 0.0 <= result.test_acc <= 1.0 and np.isfinite(result.train_loss)
