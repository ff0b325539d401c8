"""Training data decoded once and kept, augmented and normalised on the training device.

`device_loader` is what ``localearn fit --data-on-device`` gives the trainer in place of the
training `DataLoader`: the whole training split as one uint8 tensor on the device, and each
batch cut from it by one gather that does the dataset's own augmentation (random crop with
padding, reflect or zero, and the horizontal flip, where the dataset's CPU pipeline has them),
then normalised. A small model on a GPU is then not held back by decoding and augmenting on
the CPU.

What is the same as the normal loader: the batch order (the same `ShardSampler` permutation,
seeded by ``seed + epoch``, the same split across ranks, the same dropped last batch), so a
map-style dataset (digits, cifar10, svhn, stl10) gives batches of the same images; exact resume
mid-epoch. What differs: the augmentation's random numbers are drawn on the device, for every
image of the epoch at once, from a generator seeded by ``(seed, epoch)`` (on a GPU a CUDA
generator: other numbers than on the CPU); shard datasets (cifar10-shards) are read in shard
order and shuffled by the sampler's full permutation instead of the stream's shuffle buffer.
The training split uses no loader worker processes; ``--workers N`` decodes shards with N
processes at the start and still serves the test loader.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from localearn.data.datasets import PadCropFlip, TensorImages
from localearn.data.sampling import ShardSampler, sample_seed
from localearn.data.webdata import ShardStream
from localearn.errors import UserError

#: the largest training split (uint8 bytes) kept on the device
MAX_BYTES = 2**30


@dataclass(frozen=True)
class Augment:
    """Pad-crop-flip then normalise, as `PadCropFlip` or the equivalent v2 transforms do."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    mode: str = "constant"  # or "reflect"
    flip: bool = False


def _refuse(what: str) -> UserError:
    return UserError(f"--data-on-device does not support {what}; it supports random "
                     "crop with padding, horizontal flip and normalisation; drop "
                     "--data-on-device to use the normal loader")


def augment_of(transform: object) -> Augment:
    """The `Augment` a dataset's training transform amounts to; a `UserError` for any other
    transform (the device cannot reproduce it)."""
    found: dict = {}
    parts = [transform]
    while parts:
        t = parts.pop(0)
        if isinstance(t, v2.Compose):
            parts = list(t.transforms) + parts
        elif isinstance(t, PadCropFlip):
            found["mean"] = tuple(t.mean.flatten().tolist())
            found["std"] = tuple(t.std.flatten().tolist())
            if t.train_mode:
                found.update(padding=t.padding, mode=t.mode, flip=t.flip)
        elif isinstance(t, v2.ToImage):
            pass
        elif isinstance(t, v2.ToDtype):
            if t.dtype not in (torch.uint8, torch.float32) or (
                    t.dtype == torch.float32 and not t.scale):
                raise _refuse(f"the transform {t!r}")
        elif isinstance(t, v2.RandomCrop):
            pad = set(t.padding or [0])
            if len(pad) != 1 or t.pad_if_needed or t.padding_mode not in ("constant", "reflect") \
                    or (t.padding_mode == "constant" and t.fill not in (0, None)):
                raise _refuse(f"the crop {t!r}")
            found.update(padding=pad.pop(), mode=t.padding_mode)
        elif isinstance(t, v2.RandomHorizontalFlip):
            if t.p != 0.5:
                raise _refuse(f"a flip with p={t.p}")
            found["flip"] = True
        elif isinstance(t, v2.Normalize):
            found.update(mean=tuple(t.mean), std=tuple(t.std))
        else:
            raise _refuse(f"the transform {type(t).__name__}")
    if "mean" not in found:
        raise _refuse("a transform without normalisation")
    return Augment(**found)


def _identity(image: Tensor) -> Tensor:
    return image


class _ShardImages(Dataset):
    """Item i: every image and label of shard i of a `ShardStream`, decoded, in shard order."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = copy.copy(stream)
        self.stream.transform = _identity

    def __len__(self) -> int:
        return len(self.stream.shards)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from localearn.data.webdata import _warn

        images, labels = [], []
        for sample in self.stream._read_shard(self.stream.shards[i], _warn):
            try:
                image, label, _ = self.stream._decode(sample)
            except Exception as exc:  # counted and reported as the stream does
                self.stream._add(0)
                _warn(f"skipped sample {sample['__key__']!r} of {sample['__url__']}: "
                      f"{type(exc).__name__}: {exc}")
                continue
            images.append(image)
            labels.append(label)
        if not images:
            return torch.empty(0, 0, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _size_of(dataset: Dataset) -> int:
    """Bytes of the split as uint8 images, known before decoding anything."""
    if isinstance(dataset, Subset):
        whole = _size_of(dataset.dataset)
        return whole * len(dataset.indices) // max(1, len(dataset.dataset))  # type: ignore
    if isinstance(dataset, TensorImages):
        return dataset.images.numel()
    if isinstance(dataset, ShardStream):
        if dataset.image_size is None:
            raise _refuse("shards without a fixed image size")
        h, w = dataset.image_size
        return sum(s.count for s in dataset.shards) * 3 * h * w
    data = getattr(dataset, "data", None)
    if hasattr(data, "shape") and hasattr(data, "size"):
        return int(data.size)
    raise _refuse(f"the dataset type {type(dataset).__name__}")


def _transform_of(dataset: Dataset) -> object:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


def host_images(dataset: Dataset, workers: int = 0) -> tuple[Tensor, Tensor, object]:
    """uint8 images (N, C, H, W), int64 labels (N,) and the training transform of a split."""
    if isinstance(dataset, Subset):
        images, labels, tf = host_images(dataset.dataset, workers)
        keep = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return images[keep], labels[keep], tf
    if isinstance(dataset, TensorImages):
        return dataset.images, torch.as_tensor(dataset.labels, dtype=torch.long), \
            dataset.transform
    if isinstance(dataset, ShardStream):
        parts = DataLoader(_ShardImages(dataset), batch_size=None, num_workers=workers)
        pieces = [(x, y) for x, y in parts if len(y)]
        if not pieces:
            raise UserError("--data-on-device: no training images could be decoded")
        return (torch.cat([x for x, _ in pieces]), torch.cat([y for _, y in pieces]),
                dataset.transform)
    data = torch.as_tensor(dataset.data)  # torchvision style: (N, H, W, C) uint8
    if data.dtype != torch.uint8 or data.dim() != 4:
        raise _refuse(f"{type(dataset).__name__} images of dtype {data.dtype} and shape "
                      f"{tuple(data.shape)}")
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return data.permute(0, 3, 1, 2).contiguous(), labels, dataset.transform


class DeviceBatches:
    """Iterates like the training `DataLoader` (``len``, ``set_epoch``, ``sampler``,
    ``dataset``), yielding ``(images, targets)`` already on the device: float32 images,
    augmented and normalised, and int64 targets."""

    def __init__(self, dataset: Dataset, images: Tensor, labels: Tensor, augment: Augment, *,
                 batch_size: int, device: torch.device, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset, self.augment, self.batch_size = dataset, augment, batch_size
        self.device, self.seed = torch.device(device), seed
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device)
        n = len(labels)
        self.sampler = ShardSampler(n, shuffle=True, seed=seed, rank=rank,
                                    world_size=world_size)
        self.drop_last = n > batch_size * world_size  # as `make_loader` decides
        c = images.shape[1]
        self.mean = torch.tensor(augment.mean, device=self.device).expand(c).view(1, c, 1, 1)
        self.std = torch.tensor(augment.std, device=self.device).expand(c).view(1, c, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def draws(self, epoch: int) -> tuple[Tensor, Tensor]:
        """The epoch's crop offsets (N, 2) in ``0..2*padding`` and flips (N,) of every image,
        by dataset index: a function of (seed, epoch) only, whatever the rank or resume."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sample_seed(self.seed, epoch, -1))
        n, p = len(self.labels), self.augment.padding
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen, device=self.device)
        flips = torch.rand(n, generator=gen, device=self.device) < 0.5
        return offsets, flips & self.augment.flip

    def batch(self, index: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """Images ``index`` cropped at ``offsets``, flipped where ``flips``, normalised."""
        a, (c, h, w) = self.augment, self.images.shape[1:]
        p = a.padding
        rows = offsets[:, :1] - p + torch.arange(h, device=self.device)  # (B, H) in the pad
        cols = offsets[:, 1:] - p + torch.arange(w, device=self.device)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        if a.mode == "reflect":  # index -1 reads 1, index H reads H - 2, as F.pad's reflect
            rows = rows.abs()
            rows = torch.where(rows > h - 1, 2 * (h - 1) - rows, rows)
            cols = cols.abs()
            cols = torch.where(cols > w - 1, 2 * (w - 1) - cols, cols)
            inside = None
        else:
            inside = ((rows >= 0) & (rows < h))[:, None, :, None] & \
                ((cols >= 0) & (cols < w))[:, None, None, :]
            rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        chans = torch.arange(c, device=self.device)
        x = self.images[index[:, None, None, None], chans[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]].float() / 255
        if inside is not None:
            x = x * inside  # zero padding, before normalising (as the CPU pipeline pads)
        return (x - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.sampler.epoch
        offsets, flips = self.draws(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.device)
        bs = self.batch_size
        stop = len(order) - len(order) % bs if self.drop_last else len(order)
        for start in range(0, stop, bs):
            index = order[start:start + bs]
            yield self.batch(index, offsets[index], flips[index]), self.labels[index]


def device_loader(dataset: Dataset, *, batch_size: int, device: torch.device | str,
                  workers: int = 0, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> DeviceBatches:
    """The training split of ``dataset`` on ``device`` as `DeviceBatches`; a one-line
    `UserError` when it is larger than `MAX_BYTES` or its augmentation is not pad-crop-flip."""
    size = _size_of(dataset)
    if size > MAX_BYTES:
        raise UserError(f"--data-on-device keeps at most {MAX_BYTES / 2**30:.0f} GiB of uint8 "
                        f"training images on the device; this split holds "
                        f"{size / 2**30:.2f} GiB; drop --data-on-device (or use --train-limit)")
    augment = augment_of(_transform_of(dataset))  # refused before anything is decoded
    images, labels, _ = host_images(dataset, workers)
    return DeviceBatches(dataset, images, labels, augment, batch_size=batch_size,
                         device=torch.device(device), seed=seed, rank=rank,
                         world_size=world_size)
