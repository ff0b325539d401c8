"""MAN (Su et al., ECCV 2024) and MAN++ (TPAMI 2026): momentum auxiliary networks over a base rule.

Module j (j < K-1) is trained by a head of the base rule's kind that reads

    y_j = s_j * LB_j(h_j) + (2 - s_j) * EMA_j(h_j),

where h_j is module j's output (not detached: the loss reaches module j through both
branches), LB_j a trained copy of the first block of module j+1 and EMA_j its exponential
moving average twin, ``EMA = m * EMA + (1 - m) * block`` after every optimizer step (m = 0.995).
MAN fixes s_j = 1 (y = LB + EMA); MAN++ learns s_j, a free scalar starting at 1.0. The last
module is trained by the backbone's own classifier.

This is MLAAN's leap-augmented module with one copied block (p=1) and no cascade beyond module
j (k=1), without MLAAN's independent heads: `MAN` subclasses `MLAAN` and reuses its trained
copies, EMA twins, their update and its one-forward step; what it adds is the leap table (the
next module's first block) and the scale s. So ``man(dgl)`` trains like
``lam(dgl, p=1, wx=0, wy=1)`` with the leaps fixed to the next module's first block, minus the
independent heads that lam would build and score at weight 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from localearn.errors import UserError
from localearn.interfaces import DataInfo, HeadFactory, SplitNetwork

from .mlaan import MLAAN


def momentum_mix(block: nn.Module, twin: nn.Module, scale: Tensor | None, h: Tensor) -> Tensor:
    """``s * block(h) + (2 - s) * twin(h)``; ``scale`` None is MAN's fixed s = 1."""
    if scale is None:
        return block(h) + twin(h)
    return scale * block(h) + (2 - scale) * twin(h)


def momentum_leap(blocks: nn.ModuleList, twin: nn.Module, scale: Tensor | None,
                  h: Tensor) -> Tensor:
    """`momentum_mix` on the first copied block, then the other copies in order."""
    y = momentum_mix(blocks[0], twin, scale, h)
    for block in blocks[1:]:
        y = block(y)
    return y


class MAN(MLAAN):
    """MAN over a base rule; ``learn_scale=true`` is MAN++ (also registered as ``manpp``).

    Options: ``ema`` the momentum m (0.995; 1.0 freezes the twins, the public CIFAR code's
    default, a bug there), ``learn_scale`` (MAN++'s learnable s), ``recompute`` (as MLAAN's:
    checkpoint the copied block and twin, keep no module graph), ``depth`` (how many blocks of
    the next module LB_j copies, 1; the first is mixed with its twin, the others follow it:
    MAN++'s ViT heads copy 2, ``manpp(linear(pool=cls, norm=true), depth=2)``)."""

    description = ("MAN: each head reads a trained copy plus an EMA twin of the next module's "
                   "first block (ECCV 2024), e.g. man(dgl); learn_scale=true is MAN++")

    def __init__(self, base: HeadFactory, ema: float = 0.995, learn_scale: bool = False,
                 recompute: bool = False, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (got {depth}): how many blocks of the "
                             "next module each head copies")
        super().__init__(base, k=1, wx=0.0, wy=1.0, ema=ema, p=depth, recompute=recompute)
        self.depth = depth
        self.independent = False  # MAN has only the head on y
        self.learn_scale = learn_scale
        self.scales = nn.ParameterList()

    def _leap_table(self, net: SplitNetwork) -> dict[int, list[int]]:
        # LB_j and EMA_j copy the first block of module j+1 (LB_j its first `depth` blocks)
        table = {}
        for i in self.cascades:
            units = list(net.unit_ranges[i + 1])
            if len(units) < self.depth:
                fewest = min(len(r) for r in net.unit_ranges[1:])
                raise UserError(f"{self.expression}: depth={self.depth} copies the first "
                                f"{self.depth} blocks of the next module, and module {i + 1} "
                                f"has {len(units)}; at K={net.k} valid: depth <= {fewest}")
            table[i] = units[:self.depth]
        return table

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        aux = super().setup(net, info)
        for i, head in zip(self.cascades, self.cascade_heads):
            if not any(True for _ in head.parameters()):  # e.g. infopro with both weights 0
                raise UserError(f"man: the head of module {i} is empty (its loss weights are "
                                "0), and nothing else trains that module under MAN; give the "
                                "base rule weights above 0 there (e.g. infopro's ixx_2, ixy_2)")
        if self.learn_scale:  # s_j, one scalar per boundary, starting at 1.0 (MAN's sum)
            self.scales = nn.ParameterList(nn.Parameter(torch.ones(()))
                                           for _ in self.cascades)
            aux["scales"] = self.scales
        return aux

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        groups = {"heads": aux["cascade_heads"], "copies": aux["copies"],
                  "twins": aux["twins"]}
        if "scales" in aux:
            groups["scales"] = aux["scales"]
        return groups

    def lam_parameters(self, c: int) -> list[nn.Parameter]:
        extra = [self.scales[c]] if self.learn_scale else []
        return [*self.copies[c].parameters(), *extra]

    def lam_forward(self, i: int, z: Tensor) -> Tensor:
        """y_i = s * LB_i(h_i) + (2 - s) * EMA_i(h_i)."""
        c = self._position[i]
        blocks, twin = self.copies[c], self.twins[str(self.blocks[c][0])]
        scale = self.scales[c] if self.learn_scale else None
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(momentum_leap, blocks, twin, scale, z, use_reentrant=False)
        return momentum_leap(blocks, twin, scale, z)


class MANPP(MAN):
    """MAN++: MAN with a learnable scale s per boundary (``man(base, learn_scale=true)``)."""

    description = "MAN++: MAN with a learnable scale s between the copy and its EMA twin"

    def __init__(self, base: HeadFactory, ema: float = 0.995, recompute: bool = False,
                 depth: int = 1) -> None:
        super().__init__(base, ema=ema, learn_scale=True, recompute=recompute, depth=depth)
