"""DGL (Belilovsky et al., ICML 2020): each module trained by a small CNN+MLP classifier.

Two heads, picked by ``dgl(style=...)``:

- ``dgl`` (default): DGL's own ``mlp-sr`` auxiliary net (`DGLHead`), whose widths follow the
  features' channels C;
- ``public``: the fixed-width head of the public MLAAN code's DGL variant (`PublicDGLHead`),
  128 channels and a 512-wide MLP whatever C is.

MLAAN and its ablations build every head, independent and cascade, through `DGL.make_head`, so
``mlaan(dgl(style=public))`` has the public head in both places, as the public DGL+MLAAN code.

On a transformer's token boundary, shape (T, D), ``dgl`` builds `DGLTokenHead`, the same
design on tokens; ``style=public`` has no token head and is refused in one line.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape, SplitNetwork, cross_entropy
from localearn.models.token_grid import TokenGrid, on_grid, token_grid
from localearn_plugins.linear import TokenMean

Style = Literal["dgl", "public"]


class DGLHead(AuxHead):
    """DGL's ``mlp-sr`` auxiliary net: pool to a quarter of the spatial size, three 1x1
    conv-BN-ReLU of width C, pool to 2x2, a 3-layer MLP of width 4C (linear layers without bias,
    each followed by BN and ReLU), then the linear classifier; cross-entropy.

    ``width`` scales C; the hidden width is capped at ``max_width`` (128). The cap is
    localearn's own choice, not DGL's and not the public MLAAN code's: CIFAR ResNet widths
    (16/32/64) never reach it, and it keeps ImageNet-width features (up to 2048 channels, a
    4C = 8192-wide MLP) from needing hundreds of millions of parameters per head. The public
    MLAAN code's DGL variant has a different, fixed-width head: `PublicDGLHead`.

    Parameters for 10 classes at ResNet-32's widths (BatchNorm affine included):
    C=16: 14,186; C=32: 54,474; C=64: 213,386."""

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
        return cross_entropy(self(features), targets)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over every token of a (N, T, D) sequence, per feature: what BatchNorm2d after
    a 1x1 convolution does over every position of a map."""

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens.reshape(-1, tokens.shape[-1])).view_as(tokens)


class DGLTokenHead(AuxHead):
    """`DGLHead` on a (T, D) token sequence: three token-wise linear-BN-ReLU layers of width
    H = D (a 1x1 convolution is a token-wise linear layer; BN over every token), the average
    over the tokens, a 3-layer MLP of width 4H (linear layers without bias, each followed by BN
    and ReLU), then the linear classifier; cross-entropy. ``width`` scales H, capped at
    ``max_width`` (128), as in `DGLHead`. Parameters for 10 classes at D=192 (H=128):
    656,138."""

    def __init__(self, shape: Shape, info: DataInfo, width: float = 1.0,
                 max_width: int = 128) -> None:
        super().__init__(shape, info)
        d = shape[1]
        hidden = max(1, min(round(d * width), max_width))
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Linear(d if i == 0 else hidden, hidden, bias=False),
                       TokenBatchNorm(hidden), nn.ReLU(inplace=True)]
        layers.append(TokenMean())
        for i in range(3):
            layers += [nn.Linear(hidden if i == 0 else 4 * hidden, 4 * hidden, bias=False),
                       nn.BatchNorm1d(4 * hidden), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(4 * hidden, info.num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.features(features))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return cross_entropy(self(features), targets)


class PublicDGLHead(AuxHead):
    """The DGL head of the public MLAAN code's DGL variant (its ``auxDGL.py``): three 1x1
    conv(no bias)-BN-ReLU to 128 channels at the features' full resolution, global average
    pooling, a 128-512-512-512 MLP (linear layers with bias, each followed by BN and ReLU),
    then a linear classifier with bias; cross-entropy. The widths are fixed: 128 channels and
    a 512-wide MLP for any C. The code's live ``forward`` feeds the features to the convs
    directly (an earlier, commented-out one pooled to 8x8 first); so does this head.

    Parameters for 10 classes (BatchNorm affine included): 128*C + 633,098, i.e. C=16:
    635,146; C=32: 637,194; C=64: 641,290."""

    WIDTH, MLP = 128, 512

    def __init__(self, shape: Shape, info: DataInfo) -> None:
        super().__init__(shape, info)
        c = shape[0]
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c if i == 0 else self.WIDTH, self.WIDTH, 1, bias=False),
                       nn.BatchNorm2d(self.WIDTH), nn.ReLU(inplace=True)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        for i in range(3):
            layers += [nn.Linear(self.WIDTH if i == 0 else self.MLP, self.MLP),
                       nn.BatchNorm1d(self.MLP), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.MLP, info.num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.features(features))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return cross_entropy(self(features), targets)


class DGL(LocalRule):
    """Decoupled Greedy Learning: a DGL head and cross-entropy on every module.

    Options: ``width`` and ``max_width`` scale and cap `DGLHead`'s widths (``style=dgl``
    only); ``style`` dgl|public, the head (see the module docstring)."""

    description = "Decoupled Greedy Learning: a conv+MLP classifier head per module (ICML 2020)"

    def __init__(self, width: float = 1.0, max_width: int = 128, style: Style = "dgl") -> None:
        super().__init__()
        if width <= 0 or max_width < 1:
            raise ValueError(f"width must be positive and max_width at least 1 (got {width}, "
                             f"{max_width})")
        if style == "public" and (width != 1.0 or max_width != 128):
            raise ValueError("width and max_width shape DGL's own head (style=dgl); the public "
                             "head's widths are fixed")
        self.style, self.width, self.max_width = style, width, max_width
        self.model = ""  # the model's registered name, set by `configure`
        self.grid: TokenGrid | None = None  # a transformer's patch grid, set by `configure`

    def configure(self, net: SplitNetwork) -> None:
        self.model = net.model_name
        self.grid = token_grid(net)

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        if len(shape) == 2:  # (T, D) tokens: a transformer's boundary
            if self.style == "public" and self.grid is not None:  # on the patch grid
                return on_grid(PublicDGLHead(self.grid.map_shape(shape), info), self.grid,
                               shape)
            if self.style == "public":
                raise UserError(f"rule {self.expression!r} cannot train model {self.model!r}: "
                                "the public DGL head takes (C, H, W) feature maps and this "
                                f"model's boundaries are (T, D) tokens {tuple(shape)} with no "
                                "fixed patch grid; use dgl (its token head) or linear")
            return DGLTokenHead(shape, info, self.width, self.max_width)
        if self.style == "public":
            return PublicDGLHead(shape, info)
        return DGLHead(shape, info, self.width, self.max_width)
