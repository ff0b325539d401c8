"""The datasets streamed from WebDataset shards: ``cifar10-shards`` and ``imagenet-shards``.

Each split is a `localearn.data.webdata.ShardStream`; a shard folder's optional manifest
(see `localearn.data.folders`) gives sample counts, URLs and settings.
"""

from __future__ import annotations

from pathlib import Path

from localearn.data.folders import (
    find_data_dir,
    max_member_bytes,
    positive_int,
    read_manifest,
    split_entry,
    split_shards,
)
from localearn.data.splits import CIFAR10_CLASSES, DataSplits
from localearn.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar_transforms,
    imagenet_transforms,
)
from localearn.errors import UserError
from localearn.interfaces import DataInfo

__all__ = ["cifar10_shards", "find_cifar10_shards", "imagenet_shards"]


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
    manifest = read_manifest(root)
    train_tf, test_tf = cifar_transforms()
    splits = []
    for name, tf, limit, train in (("train", train_tf, train_limit, True),
                                   ("test", test_tf, test_limit, False)):
        # Path objects: local files, never read as URLs (a folder named 'pipe:...' included)
        urls = sorted(root.absolute().glob(f"cifar10-{name}-*.tar*"))
        samples = positive_int(split_entry(manifest, name).get("samples"),
                               f"{name}.samples", root / "manifest")
        splits.append(ShardStream(urls, tf, samples=samples, limit=limit,
                                  num_classes=10, train=train, seed=seed, image_size=32,
                                  max_member_bytes=max_member_bytes(manifest, root)))
    info = DataInfo(10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, CIFAR10_CLASSES)
    return DataSplits(splits[0], splits[1], info)


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
    manifest = read_manifest(root)
    where = root / "manifest"
    classes = manifest.get("classes")
    num_classes = positive_int(manifest.get("num_classes"), "num_classes", where) or (
        len(classes) if isinstance(classes, list) and classes else 1000)
    size = positive_int(manifest.get("image_size"), "image_size", where) or 224
    resize = positive_int(manifest.get("resize"), "resize", where)
    train_tf, test_tf = imagenet_transforms(size, resize)
    splits = []
    for name, tf, limit, train in (("train", train_tf, train_limit, True),
                                   ("test", test_tf, test_limit, False)):
        urls, samples = split_shards(root, manifest, name)
        splits.append(ShardStream(urls, tf, samples=samples, limit=limit,
                                  num_classes=num_classes, train=train, seed=seed,
                                  base_dir=root,
                                  max_member_bytes=max_member_bytes(manifest, root)))
    info = DataInfo(num_classes, (3, size, size), IMAGENET_MEAN, IMAGENET_STD)
    return DataSplits(splits[0], splits[1], info)
