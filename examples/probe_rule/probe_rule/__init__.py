"""A third-party localearn rule: every local module trained by a linear probe (Greedy SL)."""

from torch import Tensor, nn

from localearn import AuxHead, DataInfo, LocalRule


class ProbeHead(AuxHead):
    """Global average pooling and one linear layer, trained with cross-entropy."""

    def __init__(self, shape: tuple[int, ...], info: DataInfo) -> None:
        super().__init__(shape, info)
        self.fc = nn.Linear(shape[0], info.num_classes)

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.fc(features.mean((2, 3))), targets)


class Probe(LocalRule):
    """Greedy supervised learning: a linear probe on every module."""

    description = "greedy local learning with a linear probe per module (third-party example)"

    def make_head(self, index: int, num_modules: int, shape: tuple[int, ...],
                  info: DataInfo) -> AuxHead:
        return ProbeHead(shape, info)
