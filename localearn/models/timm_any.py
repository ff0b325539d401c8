"""Any timm model by its timm name (``--model timm:NAME``), and the ``groups`` split policy.

``timm:vit_small_patch16_224`` is `timm_model`, registered as the model family ``timm``
(entry point group ``localearn.model_families``), called with ``name="vit_small_patch16_224"``.
It builds the model with ``pretrained=False`` (never a download), the data's classes and, for
models that take an image size (ViT, DeiT, Swin and the like), the data's input size:
``img_size=(H, W)`` and ``in_chans=C``. A registered splitter must accept the model it
returns (timm's ResNet, ConvNeXt, VisionTransformer and SwinTransformer are split).
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from localearn.errors import UserError
from localearn.interfaces import LocalModuleSplitter

__all__ = ["BlockGroupsSplitter", "create", "group_cuts", "timm_model"]

LIST_HINT = "list timm's models with python -c \"import timm; print(timm.list_models('vit*'))\""


def create(name: str, num_classes: int, input_shape: tuple[int, ...] | None,
           kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name)`` without pretrained weights, for ``num_classes`` classes and
    the input shape (C, H, W) when given (``img_size`` only for models that take one)."""
    if kwargs.pop("pretrained", False):
        raise UserError("localearn never downloads weights; pretrained=True is not supported")
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}; {LIST_HINT}")
    args = dict(kwargs, pretrained=False, num_classes=num_classes)
    if input_shape is not None:
        args.setdefault("in_chans", int(input_shape[0]))
        size = (int(input_shape[1]), int(input_shape[2]))
        try:
            return timm.create_model(name, **dict(args, img_size=args.get("img_size", size)))
        except TypeError as exc:  # a model with no image size (ResNet, ConvNeXt)
            if "img_size" not in str(exc) or "img_size" in kwargs:
                raise
    return timm.create_model(name, **args)


def timm_model(name: str = "", num_classes: int = 1000,
               input_shape: tuple[int, int, int] | None = None, **kwargs: Any) -> nn.Module:
    """Any timm model by name, as timm:NAME (ViT, DeiT, Swin, ResNet, ConvNeXt), untrained.

    ``input_shape`` (C, H, W) sets ``in_chans`` and, where the model takes one, ``img_size``;
    other keywords go to ``timm.create_model`` (``depth=6``, ``embed_dim=192``, ...)."""
    if not name:
        raise UserError("model 'timm' needs a timm model name: --model timm:NAME, e.g. "
                        f"timm:vit_small_patch16_224; {LIST_HINT}")
    return create(name, num_classes, input_shape, kwargs)


def group_cuts(num_units: int, k: int) -> list[int]:
    """Cuts of the ``groups`` policy: the blocks (units 1..) in K equal groups, the stem
    (unit 0) joined to the first. The number of blocks must be divisible by K."""
    blocks = num_units - 1
    if k < 1 or blocks % k:
        valid = ", ".join(str(d) for d in range(1, blocks + 1) if blocks % d == 0)
        raise UserError(f"split 'groups' cuts the {blocks} blocks into K equal groups, so K "
                        f"must divide {blocks}: valid K: {valid} (got K={k})")
    size = blocks // k
    return [1 + size * i for i in range(1, k)]


class BlockGroupsSplitter(LocalModuleSplitter):
    """A splitter whose units are a stem and then blocks, with the ``groups`` policy (K equal
    groups of blocks, the stem in the first: MAN++'s split of a transformer) added to the
    base class's ``even`` and ``cuts:...``."""

    def cuts(self, num_units: int, k: int, policy: str = "even") -> list[int]:
        if policy == "groups":
            return group_cuts(num_units, k)
        if policy != "even" and not policy.startswith("cuts:"):
            raise UserError(f"unknown split policy {policy!r} for {type(self).__name__}; "
                            "valid: even, groups, cuts:<unit>,<unit>,...")
        return super().cuts(num_units, k, policy)
