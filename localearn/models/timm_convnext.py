"""ConvNeXt from timm, and the splitter for timm's ConvNeXt family.

ConvNeXt splits as cleanly as a ResNet: its blocks take and return (N, C, H, W) maps, so every
head built for a ResNet boundary works unchanged. Units: the patchify stem, then each block;
a stage's down-sampling layer runs at the start of the stage's first block. The final norm and
the classifier head end the last module. ConvNeXt-T has 1+18 units (K=1..19).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models.convnext import ConvNeXt
from torch import nn

from localearn.interfaces import LocalModuleSplitter

__all__ = ["TimmConvNeXtSplitter", "convnext_tiny"]


def convnext_tiny(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """timm ConvNeXt-T (blocks 3-3-9-3, widths 96..768): 19 units, K=1..19; 28.6M parameters."""
    if kwargs.pop("pretrained", False):
        raise ValueError("localearn never downloads weights; pretrained=True is not supported")
    return timm.create_model("convnext_tiny", pretrained=False, num_classes=num_classes,
                             **kwargs)


class TimmConvNeXtSplitter(LocalModuleSplitter):
    """timm ConvNeXt family: the stem, then one unit per block (down-sampling joins the
    first block of its stage)."""

    description = "timm ConvNeXt family: stem, then one unit per block"

    def accepts(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, ConvNeXt)

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        assert isinstance(backbone, ConvNeXt)
        units: list[nn.Module] = [backbone.stem]
        for stage in backbone.stages:
            blocks = list(stage.blocks)
            units.append(nn.Sequential(stage.downsample, blocks[0]))
            units.extend(blocks[1:])
        return units

    def classifier(self, backbone: nn.Module) -> nn.Module:
        assert isinstance(backbone, ConvNeXt)
        return nn.Sequential(backbone.norm_pre, backbone.head)
