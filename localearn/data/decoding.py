"""One raw shard sample made a training pair, and the member-size guard's report.

A sample (a dict of member bytes by extension) holds an image under one of `IMAGE_KEYS` and
a ``cls`` label; `decode_sample` checks the label, decodes the image to uint8 RGB, resizes it
to the stream's ``image_size`` when it differs, and applies the transform. Members over the
size limit are skipped unread by `localearn.data.shardio`; `oversized_report` words the one
line per shard that says so.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

__all__ = ["IMAGE_KEYS", "Oversized", "decode_rgb", "decode_sample", "oversized_report",
           "resize_image"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def decode_rgb(data: bytes) -> Tensor:
    """An encoded image (any format PIL reads) as a uint8 (3, H, W) RGB tensor; truncated or
    unreadable data raises. (PIL, not torchvision.io, whose decoders are deprecated.)"""
    with Image.open(io.BytesIO(data)) as img:
        return pil_to_tensor(img.convert("RGB"))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A uint8 (3, H, W) image resized (bilinear, antialiased) to ``size``."""
    out = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear",
                                          antialias=True, align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def decode_sample(sample: dict[str, Any], transform: Callable[[Tensor], Tensor],
                  num_classes: int | None, image_size: tuple[int, int] | None,
                  ) -> tuple[Tensor, int, bool]:
    """The transformed image, its label, and whether it was resized to ``image_size``; a
    sample without an image or label, or with a label outside ``0..num_classes-1``, raises."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) among {sorted(sample)}")
    if "cls" not in sample:
        raise ValueError("no cls label")
    label = int(sample["cls"].decode("ascii").strip())
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"label {label} is outside 0..{(num_classes or 1) - 1}")
    image = decode_rgb(sample[image_key])
    resized = image_size is not None and tuple(image.shape[-2:]) != image_size
    if resized:
        image = resize_image(image, image_size)
    return transform(image), label, resized


class Oversized(str):
    """A report of shard members skipped for their size (counted apart from damage)."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


def oversized_report(url: str, big: list[tuple[str, int]], cap: int) -> Oversized:
    """The line for shard ``url``'s members skipped unread: ``big`` holds (name, size) of
    each, ``cap`` the limit in bytes."""
    return Oversized(f"shard {url}: skipped {len(big)} member(s) larger than "
                     f"{_mib(cap)} without reading them (e.g. {big[0][0]}, "
                     f"{_mib(big[0][1])}); raise max_member_mb in the data's "
                     "manifest to read them")
