"""Linear heads: global average pooling and one linear layer per module.

This is the head of the public MLAAN code's CIFAR model (its ``auxMLAAN.py``): the code that
trains "MLAAN" alone builds it for the independent and the cascade heads alike, so
``mlaan(linear, k=2)`` is that model (the standalone "MLAAN" row of the paper's Table I).
Alone, ``linear`` is greedy local learning with a linear probe on every module (InfoPro's
"greedy SL" head, ``0c1f``).

On a transformer's token boundary, shape (T, D), the head averages over the T tokens (the
class token included) in place of the spatial pooling.
"""

from __future__ import annotations

from torch import Tensor, nn

from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape, cross_entropy


class TokenMean(nn.Module):
    """The average over the tokens of a (N, T, D) sequence: (N, D)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


class LinearHead(AuxHead):
    """Global average pooling, then ``Linear(C, classes)`` with bias; cross-entropy.
    Parameters: (C + 1) * classes, i.e. 170 / 330 / 650 at C = 16 / 32 / 64 for 10 classes.
    On (T, D) tokens: the average over the tokens, then ``Linear(D, classes)``."""

    def __init__(self, shape: Shape, info: DataInfo) -> None:
        super().__init__(shape, info)
        tokens = len(shape) == 2  # (T, D) tokens, not a (C, H, W) map
        self.pool: nn.Module = (TokenMean() if tokens
                                else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        self.classifier = nn.Linear(shape[1] if tokens else shape[0], info.num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.pool(features))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return cross_entropy(self(features), targets)


class Linear(LocalRule):
    """Greedy local learning with a linear head (pooling + one linear layer) per module."""

    description = ("a linear head (global pooling + one linear layer) per module; "
                   "mlaan(linear, k=2) is the public MLAAN code's CIFAR model")

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        return LinearHead(shape, info)
