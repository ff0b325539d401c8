"""Small builders shared by the rule tests: a CIFAR-shaped data description, a built run's
rule/network/aux, and a fixed random batch."""

import torch

from localearn.build import build_run
from localearn.config import make_config
from localearn.interfaces import DataInfo

INFO = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def build(rule: str, K: int, model: str = "resnet32", seed: int = 0):
    """The rule, split network and auxiliary networks of ``rule`` on ``model`` at K, on CPU."""
    run = build_run(make_config(rule=rule, model=model, k=K, seed=seed, device="cpu"),
                    info=INFO)
    return run.rule, run.net, run.aux


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 3x32x32 images and labels 0..9 in turn."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10
