"""HPFF (Su et al., ECCV 2024): hierarchical local supervision (HiLo) with patch feature fusion.

HiLo has two levels of local modules over a base rule's heads: every module i < K-1 has an
*independent* head on its own output (weight wx = 0.001), and every pair of adjacent modules
i-1, i (1 <= i <= K-2) forms a *cascade* module whose own head reads module i's output and
whose loss (weight wy = 0.999) reaches both modules. Module 0 ends no cascade (the cascade that
ends at module 1 reaches it); the final cross-entropy reaches the last two modules. This is
MLAAN's cascade of depth k=2 without leap-augmented modules: `HPFF` subclasses `MLAAN` with
k=2 and p=0, so ``hpff(dgl, patches=1)`` trains as ``mlm(dgl, k=2)``.

Patch feature fusion (PFF, `PatchFusion`, registered as ``pff``): a head is applied to an
n x n grid of patches of its input features, and the patch outputs are averaged. For a head
that returns logits (one with a ``forward``: dgl, linear) the averaged logits are scored by
cross-entropy; since the classifier is affine, that equals classifying the average of the
patch-level features (the paper's "averaging patch-level features"). A head with only a
``loss`` (infopro) is scored on every patch, each patch rebuilding its own patch of the image,
and the patch losses are averaged. ``pff(base, patches=n)`` decorates any head-based rule, so
it works under mlaan, man, or alone: ``mlaan(pff(dgl))``, ``man(pff(infopro))``, ``pff(dgl)``.
A grid that does not divide the features (2x2 on ResNet-34's 7x7 maps) gives patches whose
sizes differ by one, each run through the head on its own; a loss-only head needs an even grid.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import (
    AuxHead,
    DataInfo,
    HeadFactory,
    LocalRule,
    Shape,
    SplitNetwork,
    UpdateRule,
    cross_entropy,
)
from localearn.models.token_grid import TokenGrid, on_grid, require_grid, token_grid

from .mlaan import MLAAN


def patch_grid(x: Tensor, n: int) -> Tensor:
    """(B, C, H, W) -> (n*n*B, C, H/n, W/n): patch (r, c) of every sample, patches in row-major
    order, patch-major (rows p*B..(p+1)*B-1 hold patch p of every sample)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, n, h // n, n, w // n).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(n * n * b, c, h // n, w // n)


class PatchHead(AuxHead):
    """A base head applied to an n x n grid of patches of the features, outputs averaged."""

    def __init__(self, base: HeadFactory, index: int, num_modules: int, shape: Shape,
                 info: DataInfo, patches: int) -> None:
        super().__init__(shape, info)
        c, h, w = shape
        if h < patches or w < patches:
            raise UserError(f"patches={patches} cannot split the {h}x{w} features of module "
                            f"{index}; valid: at most {min(h, w)}")
        ci, hi, wi = info.input_shape
        self.patches = patches
        # an uneven grid (7x7 features, 2x2 patches): patch sizes differ by one (tensor_split)
        self.even = h % patches == 0 and w % patches == 0
        self.inner = base.make_head(index, num_modules, (c, -(-h // patches), -(-w // patches)),
                                    dataclasses.replace(info, input_shape=(ci, hi // patches,
                                                                           wi // patches)))
        # logits from a forward are averaged; a loss-only head is scored patch by patch
        self.fuse_outputs = type(self.inner).forward is not nn.Module.forward
        if not self.fuse_outputs and not self.even:
            raise UserError(f"patches={patches} does not divide the {h}x{w} features of module "
                            f"{index}, which a head without logits (it rebuilds the image) "
                            f"needs; valid: a common divisor of {h} and {w}")
        if not self.fuse_outputs and (hi % patches or wi % patches):
            raise UserError(f"patches={patches} does not divide the {hi}x{wi} input images, "
                            "which a head without logits (it rebuilds the image) needs split "
                            f"the same way; valid: a common divisor of {hi} and {wi}")

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        n, count = self.patches, self.patches ** 2
        if not self.even:  # patches of unequal sizes: the head runs on each one
            cells = [cell for rows in features.tensor_split(n, dim=2)
                     for cell in rows.tensor_split(n, dim=3)]
            fused = sum(self.inner(cell) for cell in cells) / count
            return cross_entropy(fused, targets)
        cells = patch_grid(features, n)
        if self.fuse_outputs:
            out = self.inner(cells)
            fused = out.reshape(count, features.shape[0], *out.shape[1:]).mean(0)
            return cross_entropy(fused, targets)
        cell_targets = targets.repeat(count, *[1] * (targets.dim() - 1))  # soft ones too
        return self.inner.loss(cells, cell_targets, patch_grid(images, n))

    def compile_parts(self) -> list[nn.Module]:
        return self.inner.compile_parts()


class PatchFusion(LocalRule):
    """Patch feature fusion over a base rule: each of its heads sees an n x n grid of patches
    (``patches``, default 2, the public code's 2x2) and their outputs are averaged."""

    description = ("patch feature fusion (HPFF): each head of a base rule applied to an n x n "
                   "grid of feature patches, outputs averaged, e.g. pff(dgl, patches=2)")

    def __init__(self, base: HeadFactory, patches: int = 2) -> None:
        super().__init__()
        if not isinstance(base, HeadFactory):
            raise ValueError(f"the base rule {getattr(base, 'expression', base)!r} has no "
                             "auxiliary heads; use a local rule such as dgl or infopro")
        if patches < 1:
            raise ValueError(f"patches must be at least 1 (got {patches})")
        self.base, self.patches = base, patches
        self.grid: TokenGrid | None = None  # a transformer's patch grid, set by `configure`
        self.model_name = ""

    def num_modules(self, requested: int | None, num_units: int) -> int:
        if isinstance(self.base, UpdateRule):
            return self.base.num_modules(requested, num_units)
        return super().num_modules(requested, num_units)

    def configure(self, net: SplitNetwork) -> None:
        self.base.configure(net)
        self.grid, self.model_name = token_grid(net), net.model_name

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        if len(shape) == 2:  # (T, D) tokens: the patches are cut from the patch grid
            grid = require_grid(self.grid, "patch fusion", "it cuts a feature map into "
                                "patches", self.model_name, shape)
            inner = PatchHead(self.base, index, num_modules, grid.map_shape(shape), info,
                              self.patches)
            return on_grid(inner, grid, shape)
        return PatchHead(self.base, index, num_modules, shape, info, self.patches)


class HPFF(MLAAN):
    """HPFF over a base rule: independent heads (wx) and depth-2 cascades (wy), every head
    with patch feature fusion over a ``patches`` x ``patches`` grid (1: none, HiLo alone)."""

    description = ("HPFF: independent heads plus depth-2 cascades with patch feature fusion "
                   "(ECCV 2024), e.g. hpff(dgl, patches=2)")

    def __init__(self, base: HeadFactory, patches: int = 2, wx: float = 0.001,
                 wy: float = 0.999, recompute: bool = False) -> None:
        if patches < 1:
            raise ValueError(f"patches must be at least 1 (got {patches})")
        if isinstance(base, HeadFactory) and patches > 1:
            base = PatchFusion(base, patches)
        super().__init__(base, k=2, wx=wx, wy=wy, p=0, recompute=recompute)
        self.patches = patches

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        return {"heads": nn.ModuleList([aux["heads"], aux["cascade_heads"]])}
