"""ImageNet ResNet-34/101/152 from timm, and the splitter for timm's ResNet family.

The factories call ``timm.create_model(name, pretrained=False, ...)``: no weights are ever
downloaded. The splitter cuts any `timm.models.resnet.ResNet` (resnet18..200, the ``d``
variants, wide and ResNeXt models) into units: the stem (conv, BN, activation and max-pool)
followed by every residual block; global pooling, dropout and ``fc`` end the last module.
ResNet-34 has 1+16 units (K=1..17), ResNet-101 1+33 (K=1..34), ResNet-152 1+50 (K=1..51).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models.resnet import ResNet
from torch import nn

from localearn.interfaces import LocalModuleSplitter

__all__ = ["TimmResNetSplitter", "resnet34", "resnet101", "resnet152"]


def _create(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    if kwargs.pop("pretrained", False):
        raise ValueError("localearn never downloads weights; pretrained=True is not supported")
    # timm zero-initialises the last BN of every block by default; the paper's ResNets (and
    # the InfoPro/DGL baselines) use the plain He et al. initialisation, so turn it off.
    kwargs.setdefault("zero_init_last", False)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """timm ResNet-34 (BasicBlocks 3-4-6-3): 17 units, K=1..17; 21.8M parameters."""
    return _create("resnet34", num_classes, kwargs)


def resnet101(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """timm ResNet-101 (Bottlenecks 3-4-23-3): 34 units, K=1..34; 44.5M parameters."""
    return _create("resnet101", num_classes, kwargs)


def resnet152(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """timm ResNet-152 (Bottlenecks 3-8-36-3): 51 units, K=1..51; 60.2M parameters."""
    return _create("resnet152", num_classes, kwargs)


class TimmResNetSplitter(LocalModuleSplitter):
    """timm ResNet family: units are the stem (with max-pool) and each residual block."""

    description = "timm ResNet family: stem with max-pool, then one unit per residual block"

    def accepts(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, ResNet)

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        assert isinstance(backbone, ResNet)
        # The same modules the backbone's forward_features runs, in the same order.
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)
        blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3,
                                  backbone.layer4) for b in layer]
        return [stem, *blocks]

    def classifier(self, backbone: nn.Module) -> nn.Module:
        assert isinstance(backbone, ResNet)
        parts: list[nn.Module] = [backbone.global_pool]
        if backbone.drop_rate:  # timm applies functional dropout between pooling and fc
            parts.append(nn.Dropout(float(backbone.drop_rate)))
        parts.append(backbone.fc)
        return nn.Sequential(*parts)
