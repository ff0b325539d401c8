"""Linear heads: global average pooling and one linear layer per module.

This is the head of the public MLAAN code's CIFAR model (its ``auxMLAAN.py``): the code that
trains "MLAAN" alone builds it for the independent and the cascade heads alike, so
``mlaan(linear, k=2)`` is that model (the standalone "MLAAN" row of the paper's Table I).
Alone, ``linear`` is greedy local learning with a linear probe on every module (InfoPro's
"greedy SL" head, ``0c1f``).

On a transformer's token boundary, shape (T, D), the head averages over the T tokens (the
class token included) in place of the spatial pooling; ``linear(pool=cls, norm=true)`` is a
ViT's own end instead (LayerNorm, the class token, the linear layer), the classifier of MAN++'s
ViT auxiliary networks.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape, SplitNetwork, cross_entropy

Pool = Literal["mean", "cls"]


class TokenMean(nn.Module):
    """The average over the tokens of a (N, T, D) sequence: (N, D)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


class FirstToken(nn.Module):
    """The first token of a (N, T, D) sequence, a ViT's class token: (N, D)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]


class LinearHead(AuxHead):
    """Global average pooling, then ``Linear(C, classes)`` with bias; cross-entropy.
    Parameters: (C + 1) * classes, i.e. 170 / 330 / 650 at C = 16 / 32 / 64 for 10 classes.
    On (T, D) tokens: the average over the tokens, then ``Linear(D, classes)``."""

    def __init__(self, shape: Shape, info: DataInfo, pool: Pool = "mean",
                 norm: bool = False) -> None:
        super().__init__(shape, info)
        tokens = len(shape) == 2  # (T, D) tokens, not a (C, H, W) map
        width = shape[1] if tokens else shape[0]
        # ViT's own end: LayerNorm over each token, then the class token
        self.norm: nn.Module = nn.LayerNorm(width, eps=1e-6) if norm else nn.Identity()
        self.pool: nn.Module = ((FirstToken() if pool == "cls" else TokenMean()) if tokens
                                else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        self.classifier = nn.Linear(width, info.num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.pool(self.norm(features)))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return cross_entropy(self(features), targets)


class Linear(LocalRule):
    """Greedy local learning with a linear head (pooling + one linear layer) per module."""

    description = ("a linear head (global pooling + one linear layer) per module; "
                   "mlaan(linear, k=2) is the public MLAAN code's CIFAR model")

    def __init__(self, pool: Pool = "mean", norm: bool = False) -> None:
        super().__init__()
        self.pool, self.norm = pool, norm
        self.model = ""

    def configure(self, net: SplitNetwork) -> None:
        self.model = net.model_name

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        if (self.pool != "mean" or self.norm) and len(shape) != 2:
            raise UserError(f"rule {self.expression!r} cannot train model {self.model!r}: "
                            "pool=cls and norm=true act on (T, D) token sequences and this "
                            f"model's boundaries are (C, H, W) feature maps {tuple(shape)}; "
                            "use linear")
        return LinearHead(shape, info, self.pool, self.norm)
