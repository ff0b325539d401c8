"""ImageNet ResNet-34/101/152 from timm, and the splitter for timm's ResNet family.

The factories call ``timm.create_model(name, pretrained=False, ...)``: no weights are ever
downloaded. The splitter cuts any `timm.models.resnet.ResNet` (resnet18..200, the ``d``
variants, wide and ResNeXt models) into units: the stem (conv, BN, activation and max-pool)
followed by every residual block; global pooling, dropout and ``fc`` end the last module.
ResNet-34 has 1+16 units (K=1..17), ResNet-101 1+33 (K=1..34), ResNet-152 1+50 (K=1..51).

Initialisation: ``resnet34`` etc. use the plain He et al. initialisation (every BatchNorm weight
1), as the CIFAR ResNets and the InfoPro/DGL baselines do. ``zero_init_last=True`` (the
``resnet34-zero-init`` etc. registered variants) zero-initialises the last BatchNorm weight of
every residual block (``bn2`` of a BasicBlock, ``bn3`` of a Bottleneck), so every block starts
as the identity: the public MLAAN ImageNet ResNet-34 does this to every BasicBlock. A rule's
copies of blocks (MLAAN's leap-augmented modules, their EMA twins) are deep copies made after
the model is built, so they carry the same zero initialisation.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from localearn.interfaces import LocalModuleSplitter

__all__ = ["TimmResNetSplitter", "last_norms", "resnet34", "resnet34_zero_init", "resnet101",
           "resnet101_zero_init", "resnet152", "resnet152_zero_init"]


def _create(name: str, num_classes: int, kwargs: dict[str, Any],
            zero_init_last: bool) -> nn.Module:
    if kwargs.pop("pretrained", False):
        raise ValueError("localearn never downloads weights; pretrained=True is not supported")
    # timm's own default is zero_init_last=True; here it is an explicit choice (module doc)
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             zero_init_last=zero_init_last, **kwargs)


def last_norms(model: nn.Module) -> list[nn.Module]:
    """The last BatchNorm of every residual block of a timm ResNet (what ``zero_init_last``
    zeroes): ``bn2`` of each BasicBlock, ``bn3`` of each Bottleneck."""
    return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in model.modules()
            if isinstance(b, (BasicBlock, Bottleneck))]


def resnet34(num_classes: int = 1000, zero_init_last: bool = False, **kwargs: Any) -> nn.Module:
    """timm ResNet-34 (BasicBlocks 3-4-6-3): 17 units, K=1..17; 21.8M parameters."""
    return _create("resnet34", num_classes, kwargs, zero_init_last)


def resnet101(num_classes: int = 1000, zero_init_last: bool = False, **kwargs: Any) -> nn.Module:
    """timm ResNet-101 (Bottlenecks 3-4-23-3): 34 units, K=1..34; 44.5M parameters."""
    return _create("resnet101", num_classes, kwargs, zero_init_last)


def resnet152(num_classes: int = 1000, zero_init_last: bool = False, **kwargs: Any) -> nn.Module:
    """timm ResNet-152 (Bottlenecks 3-8-36-3): 51 units, K=1..51; 60.2M parameters."""
    return _create("resnet152", num_classes, kwargs, zero_init_last)


def resnet34_zero_init(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """ResNet-34, every block's last BatchNorm weight 0 (registered as resnet34-zero-init): the
    public MLAAN ImageNet code's initialisation."""
    return resnet34(num_classes, zero_init_last=True, **kwargs)


def resnet101_zero_init(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """ResNet-101, every block's last BatchNorm weight 0 (registered as resnet101-zero-init)."""
    return resnet101(num_classes, zero_init_last=True, **kwargs)


def resnet152_zero_init(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """ResNet-152, every block's last BatchNorm weight 0 (registered as resnet152-zero-init)."""
    return resnet152(num_classes, zero_init_last=True, **kwargs)


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
