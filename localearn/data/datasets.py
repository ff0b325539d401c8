"""Datasets registered in the ``localearn.datasets`` group.

Every factory has the same shape, ``f(data_dir, *, download, train_limit, test_limit, seed)``,
returns `DataSplits`, and raises a `UserError` that says where it looked when files are missing.
The in-memory datasets (digits, CIFAR-10, SVHN, STL-10) are built here; the streamed ones live
in `localearn.data.shard_datasets`, the transforms in `localearn.data.transforms`, the data
folders and manifests in `localearn.data.folders`. Every factory and helper is importable from
here too (the entry points name this module).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from localearn.data.folders import DATA_ROOTS, MANIFESTS, SPLIT_ALIASES, data_dirs, find_data_dir
from localearn.data.shard_datasets import cifar10_shards, find_cifar10_shards, imagenet_shards
from localearn.data.splits import (
    CIFAR10_CLASSES,
    DIGIT_CLASSES,
    STL10_CLASSES,
    SVHN_CLASSES,
    DataSplits,
    TensorImages,
)
from localearn.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadCropFlip,
    cifar_transforms,
    imagenet_transforms,
)
from localearn.errors import UserError
from localearn.interfaces import DataInfo

__all__ = ["CIFAR10_CLASSES", "CIFAR_MEAN", "CIFAR_STD", "DATA_ROOTS", "DIGIT_CLASSES", "HALF",
           "IMAGENET_MEAN", "IMAGENET_STD", "MANIFESTS", "SPLIT_ALIASES", "STL10_CLASSES",
           "STL10_FILES", "SVHN_CLASSES", "SVHN_FILES", "DataSplits", "PadCropFlip",
           "TensorImages", "cifar10", "cifar10_shards", "cifar_transforms", "data_dirs",
           "digits", "find_cifar10_shards", "find_data_dir", "imagenet_shards",
           "imagenet_transforms", "read_stl10", "read_svhn", "stl10", "svhn"]


def _limit(n: int | None, total: int) -> int:
    return total if n is None else min(n, total)


def digits(data_dir: Path | None = None, *, download: bool = False,
           train_limit: int | None = None, test_limit: int | None = None,
           seed: int = 0) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 real images, installed with the package),
    upsampled to 3x32x32; fixed split of 1,347 train / 450 test. The default dataset."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(bunch.target)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=450, random_state=0,
                                           stratify=bunch.target)
    idx_train = idx_train[: _limit(train_limit, len(idx_train))]
    idx_test = idx_test[: _limit(test_limit, len(idx_test))]
    mean = float(x[idx_train].float().mean() / 255)
    std = float(x[idx_train].float().std() / 255)
    norm = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean] * 3, [std] * 3)])
    train_tf = v2.Compose([v2.RandomCrop(32, padding=2), norm])
    info = DataInfo(10, (3, 32, 32), (mean,) * 3, (std,) * 3, DIGIT_CLASSES)
    return DataSplits(TensorImages(x[idx_train], y[idx_train], train_tf),
                      TensorImages(x[idx_test], y[idx_test], norm), info)


def _subset(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, range(n))


def cifar10(data_dir: Path | None = None, *, download: bool = False,
            train_limit: int | None = None, test_limit: int | None = None,
            seed: int = 0) -> DataSplits:
    """CIFAR-10 through torchvision (the python-pickle batches); downloads only with --download."""
    from torchvision.datasets import CIFAR10

    what = "cifar-10-batches-py/, or add --download to fetch it there"
    if download:
        root = data_dirs(data_dir, "cifar10")[0]
    else:
        root = find_data_dir(data_dir, "cifar10",
                             lambda d: (d / "cifar-10-batches-py").is_dir(), what, "CIFAR-10")
    train_tf, test_tf = cifar_transforms()
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8)])
    try:
        train = CIFAR10(str(root), train=True, download=download,
                        transform=v2.Compose([to_tensor, train_tf]))
        test = CIFAR10(str(root), train=False, download=download,
                       transform=v2.Compose([to_tensor, test_tf]))
    except RuntimeError as exc:
        raise UserError(f"CIFAR-10 in {root} is unreadable: {exc}") from None
    info = DataInfo(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, CIFAR10_CLASSES)
    return DataSplits(_subset(train, train_limit), _subset(test, test_limit), info)


# ------------------------------------------------------------------------- SVHN, STL-10
HALF = (0.5, 0.5, 0.5)
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}


def read_svhn(path: Path) -> tuple[Tensor, Tensor]:
    """One SVHN ``*_32x32.mat`` file: uint8 images (N, 3, 32, 32) and labels 0..9 (the
    files store the digit 0 as label 10)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except Exception as exc:  # scipy raises many types for a damaged file
        raise UserError(f"SVHN file {path} is unreadable ({type(exc).__name__}: {exc})") \
            from None
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise UserError(f"SVHN file {path}: X has shape {x.shape}, expected (32, 32, 3, "
                        f"{len(y)})")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise UserError(f"SVHN file {path}: labels must be 1..10 (10 is the digit 0)")
    y[y == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8))
    return images, torch.from_numpy(y)


def svhn(data_dir: Path | None = None, *, download: bool = False,
         train_limit: int | None = None, test_limit: int | None = None,
         seed: int = 0) -> DataSplits:
    """SVHN from torchvision's .mat files: 73,257 train / 26,032 test images, 32x32.

    No ``extra`` split, as in the paper; its augmentation: random crop 32 with padding 2, no
    flip, mean = std = 0.5."""
    def holds(d: Path) -> bool:
        return all((d / f).is_file() for f in SVHN_FILES.values())

    if download and not any(holds(d) for d in data_dirs(data_dir, "svhn")):
        from torchvision.datasets import SVHN

        root = data_dirs(data_dir, "svhn")[0]
        for split in SVHN_FILES:
            SVHN(str(root), split=split, download=True)
    found = find_data_dir(data_dir, "svhn", holds,
                          f"{' and '.join(SVHN_FILES.values())}, or add --download to fetch "
                          "them there", "SVHN")
    train_tf = PadCropFlip(HALF, HALF, train=True, padding=2, mode="constant", flip=False)
    test_tf = PadCropFlip(HALF, HALF, train=False)
    out = []
    for split, limit, tf in (("train", train_limit, train_tf), ("test", test_limit, test_tf)):
        x, y = read_svhn(found / SVHN_FILES[split])
        n = _limit(limit, len(y))
        out.append(TensorImages(x[:n], y[:n], tf))
    return DataSplits(out[0], out[1], DataInfo(10, (3, 32, 32), HALF, HALF, SVHN_CLASSES))


def read_stl10(images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    """One STL-10 binary split: uint8 images (N, 3, 96, 96), labels 0..9 (stored 1..10).
    Each image is stored channel by channel, column-major."""
    side = 96
    per_image = 3 * side * side
    raw = np.fromfile(images, dtype=np.uint8)
    y = np.fromfile(labels, dtype=np.uint8).astype(np.int64)
    if raw.size % per_image or raw.size // per_image != len(y):
        raise UserError(f"STL-10 files {images.name}/{labels.name} disagree: "
                        f"{raw.size / per_image:g} images of 3x96x96 bytes, {len(y)} labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise UserError(f"STL-10 file {labels}: labels must be 1..10")
    x = raw.reshape(-1, 3, side, side).transpose(0, 1, 3, 2)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y - 1)


def stl10(data_dir: Path | None = None, *, download: bool = False,
          train_limit: int | None = None, test_limit: int | None = None,
          seed: int = 0) -> DataSplits:
    """STL-10 from its binary files: 10 classes, 5,000 train / 8,000 test images, 96x96.

    Reads ``stl10_binary/`` (the unlabelled split is unused); the paper's augmentation: random
    crop 96 with padding 4, flip, mean = std = 0.5."""
    names = [f for pair in STL10_FILES.values() for f in pair]

    def holds(d: Path) -> bool:
        return all((d / "stl10_binary" / f).is_file() for f in names) or \
            all((d / f).is_file() for f in names)

    if download and not any(holds(d) for d in data_dirs(data_dir, "stl10")):
        from torchvision.datasets import STL10

        # the archive holds every split
        STL10(str(data_dirs(data_dir, "stl10")[0]), split="train", download=True)
    found = find_data_dir(data_dir, "stl10", holds,
                          "stl10_binary/ (train_X.bin ...), or add --download to fetch it there",
                          "STL-10")
    if (found / "stl10_binary").is_dir():
        found = found / "stl10_binary"
    train_tf = PadCropFlip(HALF, HALF, train=True, padding=4, mode="constant", flip=True)
    test_tf = PadCropFlip(HALF, HALF, train=False)
    out = []
    for split, limit, tf in (("train", train_limit, train_tf), ("test", test_limit, test_tf)):
        x, y = read_stl10(*(found / f for f in STL10_FILES[split]))
        n = _limit(limit, len(y))
        out.append(TensorImages(x[:n], y[:n], tf))
    # 10 classes: the public MLAAN/InfoPro code builds a 100-way classifier here by a typo
    return DataSplits(out[0], out[1], DataInfo(10, (3, 96, 96), HALF, HALF, STL10_CLASSES))
