"""A job for tests/test_pipeline.py, run under torchrun: registers a third-party rule (`Probe`,
built on LocalRule, defined here and in no installed package), then runs ``localearn ARGS``."""

from __future__ import annotations

import os
import sys

from torch import Tensor, nn

from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape, SplitNetwork


class ProbeHead(AuxHead):
    """Global average pooling and a linear classifier; cross-entropy."""

    def __init__(self, shape: Shape, info: DataInfo) -> None:
        super().__init__(shape, info)
        self.fc = nn.Linear(shape[0], info.num_classes)

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.fc(features.mean((2, 3))), targets)


class Probe(LocalRule):
    """A linear probe per module. ``crash_at=N``: the process training the last module exits
    abruptly (exit code 3) at its N-th step, as a stage that dies would."""

    description = "test rule: a linear probe per module"

    def __init__(self, crash_at: int = 0) -> None:
        super().__init__()
        self.crash_at, self.calls = crash_at, 0

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        return ProbeHead(shape, info)

    def module_loss(self, net: SplitNetwork, index: int, x: Tensor, images: Tensor,
                    targets: Tensor) -> tuple[Tensor, Tensor]:
        if index == net.k - 1 and net.training:
            self.calls += 1
            if self.calls == self.crash_at:
                os._exit(3)
        return super().module_loss(net, index, x, images, targets)


if __name__ == "__main__":
    from localearn import registry
    from localearn.cli import main

    registry.register("rule", "pipeprobe", Probe)
    sys.exit(main(sys.argv[1:]))
