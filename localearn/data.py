"""Datasets registered in the ``localearn.datasets`` group.

Every factory has the same shape, ``f(data_dir, *, download, train_limit, test_limit, seed)``,
returns `DataSplits`, and raises a `UserError` that says where it looked when files are missing.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2

from localearn.errors import UserError
from localearn.interfaces import DataInfo

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass
class DataSplits:
    train: Dataset
    test: Dataset
    info: DataInfo


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) in memory with labels; ``transform`` maps a uint8 image to the
    normalised float tensor the network sees."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def cifar_transforms(mean=CIFAR_MEAN, std=CIFAR_STD) -> tuple[v2.Transform, v2.Transform]:
    """The paper's CIFAR augmentation: reflect-pad 4, random crop 32, flip; then normalise."""
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"),
                        v2.RandomHorizontalFlip(), *finish])
    return train, v2.Compose(finish)


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
    info = DataInfo(10, (3, 32, 32), (mean,) * 3, (std,) * 3)
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

    root = Path(data_dir or os.environ.get("LOCALEARN_DATA", "data"))
    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise UserError(f"CIFAR-10 not found: looked for {root / 'cifar-10-batches-py'}; pass "
                        "--data-dir DIR holding cifar-10-batches-py/, or add --download to "
                        "fetch it there")
    train_tf, test_tf = cifar_transforms()
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8)])
    try:
        train = CIFAR10(str(root), train=True, download=download,
                        transform=v2.Compose([to_tensor, train_tf]))
        test = CIFAR10(str(root), train=False, download=download,
                       transform=v2.Compose([to_tensor, test_tf]))
    except RuntimeError as exc:
        raise UserError(f"CIFAR-10 in {root} is unreadable: {exc}") from None
    info = DataInfo(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD)
    return DataSplits(_subset(train, train_limit), _subset(test, test_limit), info)


SHARD_CANDIDATES = ("{env}/cifar10", "../shared/data/cifar10", "data/cifar10")


def find_cifar10_shards(data_dir: Path | None) -> Path:
    """The folder holding ``cifar10-{train,test}-*.tar.gz``; a `UserError` lists where it looked."""
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        env = os.environ.get("LOCALEARN_DATA")
        candidates = [Path(c.format(env=env)) for c in SHARD_CANDIDATES if env or "{env}" not in c]
    for c in candidates:
        if sorted(c.glob("cifar10-train-*.tar*")) and sorted(c.glob("cifar10-test-*.tar*")):
            return c
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise UserError(f"CIFAR-10 shards not found (looked in {looked}); pass --data-dir DIR "
                    "holding cifar10-train-*.tar.gz and cifar10-test-*.tar.gz (WebDataset "
                    "shards with keys jpg and cls)")


def read_shards(paths: list[Path], limit: int | None) -> tuple[Tensor, Tensor]:
    """Decode up to ``limit`` (jpg, cls) samples from WebDataset shards into uint8 tensors."""
    import webdataset as wds
    from PIL import Image

    images, labels = [], []
    pipeline = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    for sample in pipeline:
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        labels.append(int(sample["cls"]))
        if limit is not None and len(labels) >= limit:
            break
    return torch.stack(images), torch.tensor(labels)


def cifar10_shards(data_dir: Path | None = None, *, download: bool = False,
                   train_limit: int | None = None, test_limit: int | None = None,
                   seed: int = 0) -> DataSplits:
    """CIFAR-10 from WebDataset shards (keys jpg, cls), decoded once into memory."""
    root = find_cifar10_shards(data_dir)
    train_x, train_y = read_shards(sorted(root.glob("cifar10-train-*.tar*")), train_limit)
    test_x, test_y = read_shards(sorted(root.glob("cifar10-test-*.tar*")), test_limit)
    train_tf, test_tf = cifar_transforms()
    info = DataInfo(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD)
    return DataSplits(TensorImages(train_x, train_y, train_tf),
                      TensorImages(test_x, test_y, test_tf), info)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The loader for a split. Map-style sets are shuffled (train) by a seeded generator, or
    sharded with a DistributedSampler when ``world_size > 1``; an `IterableDataset` shuffles and
    shards itself. The engine calls ``set_epoch(epoch)`` on the sampler or dataset if present."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                          drop_last=train)
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size,
                                                      rank=rank, shuffle=train, seed=seed)
    elif train:
        sampler = torch.utils.data.RandomSampler(
            dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train and len(dataset) > batch_size * world_size)
