"""What a dataset factory returns: `DataSplits` (the train and test sets with their
`DataInfo`), `TensorImages` (uint8 images held in memory) and the built-in datasets' class
names, in label order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from localearn.interfaces import DataInfo

__all__ = ["CIFAR10_CLASSES", "DIGIT_CLASSES", "DataSplits", "STL10_CLASSES", "SVHN_CLASSES",
           "TensorImages"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SVHN_CLASSES = DIGIT_CLASSES  # label 0 is the digit 0 (torchvision maps SVHN's 10 to 0)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck")


@dataclass
class DataSplits:
    """The training and test sets; ``val``: a validation set held out of the training set
    (``--val-split``, see `localearn.data.holdout`), ``val_digest`` naming which images."""

    train: Dataset
    test: Dataset
    info: DataInfo
    val: Dataset | None = None
    val_digest: str | None = None


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) in memory with labels; ``transform`` maps a uint8 image to the
    normalised float tensor the network sees."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])
