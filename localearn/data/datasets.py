"""Datasets registered in the ``localearn.datasets`` group.

Every factory has the same shape, ``f(data_dir, *, download, train_limit, test_limit, seed)``,
returns `DataSplits`, and raises a `UserError` that says where it looked when files are missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from localearn.errors import UserError
from localearn.interfaces import DataInfo

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SVHN_CLASSES = DIGIT_CLASSES  # label 0 is the digit 0 (torchvision maps SVHN's 10 to 0)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck")


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


class PadCropFlip(torch.nn.Module):
    """A uint8 (C, H, W) image to a normalised float tensor; with ``train``, first pad by
    ``padding`` (``reflect`` or zero ``constant``), crop back to H x W at a random offset and,
    with ``flip``, mirror half the images. Plain tensor ops: torchvision's per-transform
    overhead is several times the work itself on a 32x32 image. Randomness from torch's RNG."""

    def __init__(self, mean, std, *, train: bool, padding: int = 4,
                 mode: str = "reflect", flip: bool = True) -> None:
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.train_mode, self.padding, self.mode, self.flip = train, padding, mode, flip

    def forward(self, img: Tensor) -> Tensor:
        x = img.as_subclass(Tensor).float() / 255  # a new tensor: the stored image stays
        if self.train_mode:
            h, w = x.shape[-2:]
            p = self.padding
            if p:
                x = torch.nn.functional.pad(x[None], (p, p, p, p), mode=self.mode)[0]
                i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
                x = x[:, i:i + h, j:j + w]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return (f"train={self.train_mode}, padding={self.padding}, mode={self.mode!r}, "
                f"flip={self.flip}")


def cifar_transforms(mean=CIFAR_MEAN, std=CIFAR_STD) -> tuple[PadCropFlip, PadCropFlip]:
    """The paper's CIFAR augmentation: reflect-pad 4, random crop 32, flip; then normalise."""
    return PadCropFlip(mean, std, train=True), PadCropFlip(mean, std, train=False)


def _limit(n: int | None, total: int) -> int:
    return total if n is None else min(n, total)


# ------------------------------------------------------------------------- data folders
#: where a dataset NAME is looked for when --data-dir is not given; LOCALEARN_DATA is the root
#: that holds one folder per dataset (``$LOCALEARN_DATA/cifar10``, ``$LOCALEARN_DATA/svhn``...)
DATA_ROOTS = ("{env}", "data", "../shared/data")


def data_dirs(data_dir: Path | None, name: str) -> list[Path]:
    """The folders to look in for dataset ``name``: ``data_dir`` (and ``data_dir/name``) when
    given; else ``NAME`` under ``$LOCALEARN_DATA``, ``data/`` and ``../shared/data/``."""
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("LOCALEARN_DATA")
    return [Path(r.format(env=env)) / name for r in DATA_ROOTS if env or "{env}" not in r]


def find_data_dir(data_dir: Path | None, name: str, holds: Callable[[Path], bool],
                  what: str, title: str) -> Path:
    """The first of `data_dirs` for which ``holds(folder)`` is true; else a `UserError` that
    names the data set (``title``), lists where it looked and says what the folder must hold
    (``what``)."""
    candidates = data_dirs(data_dir, name)
    for c in candidates:
        if c.is_dir() and holds(c):
            return c
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise UserError(f"{title} not found: looked for it in {looked}; pass --data-dir DIR "
                    f"holding {what}")


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


def find_cifar10_shards(data_dir: Path | None) -> Path:
    """The folder holding ``cifar10-{train,test}-*.tar.gz``."""
    return find_data_dir(
        data_dir, "cifar10",
        lambda d: any(d.glob("cifar10-train-*.tar*")) and any(d.glob("cifar10-test-*.tar*")),
        "cifar10-train-*.tar.gz and cifar10-test-*.tar.gz (WebDataset shards with keys jpg "
        "and cls)", "CIFAR-10 shards")


def cifar10_shards(data_dir: Path | None = None, *, download: bool = False,
                   train_limit: int | None = None, test_limit: int | None = None,
                   seed: int = 0) -> DataSplits:
    """CIFAR-10 streamed from WebDataset shards (keys jpg, cls), decoded on the workers."""
    from localearn.data.webdata import ShardStream

    root = find_cifar10_shards(data_dir)
    manifest = _read_manifest(root)
    train_tf, test_tf = cifar_transforms()
    splits = []
    for name, tf, limit, train in (("train", train_tf, train_limit, True),
                                   ("test", test_tf, test_limit, False)):
        # Path objects: local files, never read as URLs (a folder named 'pipe:...' included)
        urls = sorted(root.absolute().glob(f"cifar10-{name}-*.tar*"))
        samples = _positive_int(_split_entry(manifest, name).get("samples"),
                                f"{name}.samples", root / "manifest")
        splits.append(ShardStream(urls, tf, samples=samples, limit=limit,
                                  num_classes=10, train=train, seed=seed, image_size=32,
                                  max_member_bytes=_max_member(manifest, root)))
    info = DataInfo(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, CIFAR10_CLASSES)
    return DataSplits(splits[0], splits[1], info)


# ------------------------------------------------------------------ ImageNet-style shards
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MANIFESTS = ("manifest.json", "manifest.toml")
SPLIT_ALIASES = {"train": ("train",), "test": ("test", "val", "validation")}


def imagenet_transforms(size: int = 224, resize: int | None = None,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[v2.Transform, v2.Transform]:
    """Train: RandomResizedCrop ``size``, flip; eval: resize to ``resize`` (256 for 224),
    center-crop ``size``; both normalised. They take uint8 (3, H, W) tensors."""
    resize = resize or round(size * 256 / 224)
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                        *finish])
    test = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), *finish])
    return train, test


def _read_manifest(root: Path) -> dict:
    """``manifest.json`` or ``manifest.toml`` in a shard folder ({} when there is none)."""
    import json
    import tomllib

    for name in MANIFESTS:
        path = root / name
        if path.is_file():
            try:
                data = (json.loads(path.read_text()) if name.endswith(".json")
                        else tomllib.loads(path.read_text()))
            except (ValueError, tomllib.TOMLDecodeError) as exc:
                raise UserError(f"{path} is not valid: {str(exc).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise UserError(f"{path} must hold a table of settings")
            return data
    return {}


def _split_entry(manifest: dict, split: str) -> dict:
    for name in SPLIT_ALIASES[split]:
        entry = manifest.get(name)
        if isinstance(entry, dict):
            return entry
    return {}


def _positive_int(value: object, what: str, where: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: {what} must be a positive integer (got {value!r})")
    return value


def _max_member(manifest: dict, root: Path) -> int:
    """The largest shard member read, in bytes: the manifest's ``max_member_mb`` (MiB), else
    64 MiB; larger members are skipped unread and reported."""
    from localearn.data.shardio import MAX_MEMBER_BYTES

    mb = _positive_int(manifest.get("max_member_mb"), "max_member_mb", root / "manifest")
    return MAX_MEMBER_BYTES if mb is None else mb << 20


def _split_shards(root: Path, manifest: dict,
                  split: str) -> tuple[list[Path] | list[str] | str, int | None]:
    """Shard specs and sample count of one split: the manifest's ``urls``, or the local files
    named ``*{split}-*.tar*`` (``val``/``validation`` also serve as the test split)."""
    entry = _split_entry(manifest, split)
    where = root / "manifest"
    samples = _positive_int(entry.get("samples"), f"{split}.samples", where)
    urls = entry.get("urls")
    if urls is not None:
        if not (isinstance(urls, str) or (isinstance(urls, list)
                                          and all(isinstance(u, str) for u in urls))):
            raise UserError(f"{where}: {split}.urls must be a string or a list of strings")
        return urls, samples
    for name in SPLIT_ALIASES[split]:
        found = sorted(root.absolute().glob(f"*{name}-*.tar*"))  # local paths, never URLs
        if found:
            expected = entry.get("shards")
            if isinstance(expected, int) and expected != len(found):
                raise UserError(f"{root}: the manifest lists {expected} {split} shards but "
                                f"{len(found)} are there")
            return found, samples
    raise UserError(f"no {split} shards in {root}: expected files named "
                    f"'{'val' if split == 'test' else 'train'}-000000.tar' and so on"
                    f", or '{split}.urls' in {root / MANIFESTS[0]}")


def imagenet_shards(data_dir: Path | None = None, *, download: bool = False,
                    train_limit: int | None = None, test_limit: int | None = None,
                    seed: int = 0) -> DataSplits:
    """ImageNet-style WebDataset shards, streamed (1000 classes, 224x224 crops by default).

    ``DIR`` holds ``train-*.tar`` and ``val-*.tar`` (or ``.tar.gz``), or a ``manifest.json``
    (or ``.toml``) with ``train``/``val`` tables of ``urls`` (brace patterns, http(s) URLs;
    ``pipe:`` URLs only where allowed, see `localearn.data.webdata`) and ``samples``, and
    optional ``num_classes`` (or a ``classes`` list), ``image_size`` and ``max_member_mb``
    (the largest shard member read, default 64; larger ones are skipped unread).
    """
    from localearn.data.webdata import ShardStream

    if download:
        raise UserError("ImageNet cannot be downloaded automatically; write it as WebDataset "
                        "shards and pass --data-dir")
    root = find_data_dir(
        data_dir, "imagenet",
        lambda d: True,  # any folder: what it lacks is said below, split by split
        "train-*.tar and val-*.tar shards (keys jpg/jpeg/png and cls), or a manifest.json "
        "naming them", "ImageNet shards")
    manifest = _read_manifest(root)
    where = root / "manifest"
    classes = manifest.get("classes")
    num_classes = _positive_int(manifest.get("num_classes"), "num_classes", where) or (
        len(classes) if isinstance(classes, list) and classes else 1000)
    size = _positive_int(manifest.get("image_size"), "image_size", where) or 224
    resize = _positive_int(manifest.get("resize"), "resize", where)
    train_tf, test_tf = imagenet_transforms(size, resize)
    splits = []
    for name, tf, limit, train in (("train", train_tf, train_limit, True),
                                   ("test", test_tf, test_limit, False)):
        urls, samples = _split_shards(root, manifest, name)
        splits.append(ShardStream(urls, tf, samples=samples, limit=limit,
                                  num_classes=num_classes, train=train, seed=seed,
                                  base_dir=root, max_member_bytes=_max_member(manifest, root)))
    info = DataInfo(num_classes, (3, size, size), IMAGENET_MEAN, IMAGENET_STD)
    return DataSplits(splits[0], splits[1], info)


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
