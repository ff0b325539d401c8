"""A validation set held out of the training set (``--val-split``): the same images for every
seed (drawn once with `VAL_SEED`), seen with the test set's transform, never trained on.

A map-style training set gives up an exact count of images, drawn at random. A stream of
shards (`ShardStream`) cannot be indexed: a sample goes to validation when a hash of its key
falls below the held-out share, so the split is as deterministic, and its size is that share
of the stream up to sampling noise."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from localearn.data.splits import DataSplits
from localearn.errors import UserError

#: the validation images are drawn with this seed, whatever the run's own seed
VAL_SEED = 0


def held_out_count(val_split: float, n_train: int) -> int:
    """How many of ``n_train`` images ``val_split`` holds out (a count, or a share)."""
    count = int(val_split) if val_split >= 1 else round(val_split * n_train)
    if not 1 <= count < n_train:
        raise UserError(f"--val-split {val_split:g} holds out {count} of the {n_train} training "
                        "images; valid: at least 1 image and fewer than all of them (a count, "
                        "or a share between 0 and 1)")
    return count


def hold_out(data: DataSplits, val_split: float) -> DataSplits:
    """``data`` with ``val`` set: ``val_split`` images (or that share) of the training set,
    with the test set's transform; ``train`` keeps the rest."""
    n_train = len(data.train)
    count = held_out_count(val_split, n_train)
    if isinstance(data.train, IterableDataset):
        if not hasattr(data.train, "part"):
            raise UserError(f"dataset {data.info.name or ''!s} is a stream localearn cannot "
                            "split; --val-split needs a map-style dataset or shards")
        share = count / n_train
        train = data.train.part("train", share)
        val = data.train.part("val", share, transform=transform_of(data.test))
        return DataSplits(train, data.test, data.info, val=val,
                          val_digest=f"key-hash<{share:.6g}")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(VAL_SEED))
    val_idx = sorted(order[:count].tolist())
    train_idx = sorted(order[count:].tolist())
    digest = hashlib.sha256(",".join(map(str, val_idx)).encode()).hexdigest()[:16]
    val = Subset(with_transform(data.train, transform_of(data.test)), val_idx)
    return DataSplits(Subset(data.train, train_idx), data.test, data.info, val=val,
                      val_digest=digest)


def transform_of(dataset: Dataset) -> Any:
    """The transform a dataset applies to its images (through `Subset` wrappers)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    if transform is None:
        raise UserError(f"the test set ({type(dataset).__name__}) names no transform, so its "
                        "training images cannot be evaluated alike; --val-split needs datasets "
                        "with a 'transform' attribute")
    return transform


def with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """A view of ``dataset`` whose images go through ``transform`` instead of its own (the
    images themselves are shared, not copied)."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, "transform"):
        raise UserError(f"the training set ({type(dataset).__name__}) names no transform; "
                        "--val-split needs datasets with a 'transform' attribute")
    view = copy.copy(dataset)
    view.transform = transform
    return view
