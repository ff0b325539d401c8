"""DGL (Belilovsky et al., ICML 2020): each module trained by a small CNN+MLP classifier."""

from __future__ import annotations

import math

from torch import Tensor, nn

from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape


class DGLHead(AuxHead):
    """DGL's ``mlp-sr`` auxiliary net: pool to a quarter of the spatial size, three 1x1
    conv-BN-ReLU, pool to 2x2, a 3-layer MLP of width 4C, then the classifier; cross-entropy.
    The hidden width C is capped at ``max_width`` (128: the public MLAAN code's DGL head), so
    ImageNet-width features (up to 2048 channels) do not need billions of head parameters."""

    def __init__(self, shape: Shape, info: DataInfo, width: float = 1.0,
                 max_width: int = 128) -> None:
        super().__init__(shape, info)
        c, h, w = shape
        hidden = max(1, min(round(c * width), max_width))
        convs: list[nn.Module] = []
        for i in range(3):
            convs += [nn.Conv2d(c if i == 0 else hidden, hidden, 1, bias=False),
                      nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        mlp: list[nn.Module] = []
        for _ in range(3):
            mlp += [nn.Linear(4 * hidden, 4 * hidden, bias=False), nn.BatchNorm1d(4 * hidden),
                    nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d((math.ceil(h / 4), math.ceil(w / 4))), *convs,
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), *mlp)
        self.classifier = nn.Linear(4 * hidden, info.num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.features(features))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self(features), targets)


class DGL(LocalRule):
    """Decoupled Greedy Learning: a DGL head and cross-entropy on every module."""

    description = "Decoupled Greedy Learning: a conv+MLP classifier head per module (ICML 2020)"

    def __init__(self, width: float = 1.0, max_width: int = 128) -> None:
        super().__init__()
        if width <= 0 or max_width < 1:
            raise ValueError(f"width must be positive and max_width at least 1 (got {width}, "
                             f"{max_width})")
        self.width, self.max_width = width, max_width

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        return DGLHead(shape, info, self.width, self.max_width)
