"""Datasets, the loader factory, WebDataset streams and resumable sampling.

Every dataset factory is registered in the ``localearn.datasets`` entry-point group, has the
shape ``f(data_dir, *, download, train_limit, test_limit, seed) -> DataSplits`` and looks for
its files with `find_data_dir` (one meaning of ``LOCALEARN_DATA``: the root holding one folder
per dataset).
"""

from localearn.data.datasets import (
    CIFAR_MEAN,
    CIFAR_STD,
    DataSplits,
    PadCropFlip,
    TensorImages,
    cifar10,
    cifar10_shards,
    cifar_transforms,
    data_dirs,
    digits,
    find_data_dir,
    imagenet_shards,
    imagenet_transforms,
    read_stl10,
    read_svhn,
    stl10,
    svhn,
)
from localearn.data.loaders import make_loader

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "DataSplits", "PadCropFlip", "TensorImages", "cifar10",
           "cifar10_shards", "cifar_transforms", "data_dirs", "digits", "find_data_dir",
           "imagenet_shards", "imagenet_transforms", "make_loader", "read_stl10", "read_svhn",
           "stl10", "svhn"]
