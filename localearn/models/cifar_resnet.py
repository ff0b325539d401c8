"""CIFAR ResNet-32/110 (He et al. 2016): a 3x3 stem, three stages of BasicBlocks at widths
16/32/64, global pooling and a linear classifier. Also registered with timm, so
``timm.create_model("resnet32")`` builds the same network once localearn is imported.
"""

from __future__ import annotations

from timm.models import register_model
from torch import Tensor, nn

from localearn.interfaces import LocalModuleSplitter

__all__ = ["BasicBlock", "CifarResNet", "CifarResNetSplitter", "resnet32", "resnet110"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks`` BasicBlocks per stage (5: ResNet-32, 18: ResNet-110)."""

    def __init__(self, blocks: int, num_classes: int = 10, widths=(16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for s, width in enumerate(widths):
            layer = [BasicBlock(cin if b == 0 else width, width, 2 if (s > 0 and b == 0) else 1)
                     for b in range(blocks)]
            stages.append(nn.Sequential(*layer))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(widths[-1], num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x)


def _drop_timm_kwargs(kwargs: dict) -> dict:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return kwargs


@register_model
def resnet32(pretrained: bool = False, num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32: stem + 15 BasicBlocks (16 units, K=1..16), 0.46M parameters."""
    if pretrained:
        raise ValueError("no pretrained weights exist for resnet32")
    return CifarResNet(5, num_classes, **_drop_timm_kwargs(kwargs))


@register_model
def resnet110(pretrained: bool = False, num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110: stem + 54 BasicBlocks (55 units, K=1..55), 1.7M parameters."""
    if pretrained:
        raise ValueError("no pretrained weights exist for resnet110")
    return CifarResNet(18, num_classes, **_drop_timm_kwargs(kwargs))


class CifarResNetSplitter(LocalModuleSplitter):
    """CIFAR ResNet: units are the stem and each BasicBlock; the pooled classifier ends the net."""

    def accepts(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, CifarResNet)

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        assert isinstance(backbone, CifarResNet)
        return [backbone.stem, *backbone.layer1, *backbone.layer2, *backbone.layer3]

    def classifier(self, backbone: nn.Module) -> nn.Module:
        assert isinstance(backbone, CifarResNet)
        return backbone.head
