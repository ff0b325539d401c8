"""The datasets' normalisation constants and augmentations: `PadCropFlip` (pad, random crop,
flip, normalise: CIFAR, SVHN, STL-10), the paper's CIFAR pair and the ImageNet pair. All take
uint8 (C, H, W) tensors."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "PadCropFlip",
           "cifar_transforms", "imagenet_transforms"]

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
