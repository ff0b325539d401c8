"""Swin transformers from timm, and the splitter for timm's SwinTransformer.

Units: the patch embedding (with its norm) as the stem, then each Swin block; a stage's patch
merging (its down-sampling) runs at the start of the stage's first block, as ConvNeXt's
down-sampling does. The final norm and the classifier head (pooling, dropout, ``fc``) end the
last module.

timm's Swin computes on (N, H, W, C) tensors. Every unit here takes and returns the same
values as a (N, C, H, W) view (a permutation of the dimensions, no copy, no arithmetic), so a
Swin boundary is a feature map like a ResNet's or a ConvNeXt's and heads built for those work
unchanged. The split network's output equals the unsplit model's exactly.
"""

from __future__ import annotations

from typing import Any

from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from localearn.errors import UserError
from localearn.models.timm_any import BlockGroupsSplitter, create

__all__ = ["SwinUnit", "TimmSwinSplitter", "swin_tiny"]


def swin_tiny(num_classes: int = 1000, input_shape: tuple[int, int, int] | None = None,
              **kwargs: Any) -> nn.Module:
    """timm Swin-T (patch 4, window 7, blocks 2-2-6-2, width 96..768) at the data's input size:
    13 units, K=1..13; 28.3M parameters for 1000 classes."""
    return create("swin_tiny_patch4_window7_224", num_classes, input_shape, kwargs)


class SwinUnit(nn.Module):
    """Runs ``body`` on (N, H, W, C) tensors between (N, C, H, W) views: ``first`` (the stem)
    takes images, ``last`` (the classifier) returns what ``body`` returns."""

    def __init__(self, body: nn.Module, first: bool = False, last: bool = False) -> None:
        super().__init__()
        self.body, self.first, self.last = body, first, last

    def forward(self, x: Tensor) -> Tensor:
        if not self.first:
            x = x.permute(0, 2, 3, 1)  # back to the (N, H, W, C) tensor the last unit made
        x = self.body(x)
        return x if self.last else x.permute(0, 3, 1, 2)


#: SwinTransformer methods whose work the units reproduce
REPRODUCED = ("forward_features", "forward_head", "forward")


class TimmSwinSplitter(BlockGroupsSplitter):
    """timm SwinTransformer: the patch embedding, then one unit per Swin block (a stage's
    patch merging joins its first block); boundaries are (N, C, H, W) views.

    Split policies: ``even``, ``cuts:...`` and ``groups`` (the blocks in K equal groups, the
    stem in the first)."""

    description = "timm Swin: patch embedding, then one unit per block (merging joins its stage)"

    def accepts(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, SwinTransformer)

    def check(self, backbone: nn.Module) -> SwinTransformer:
        assert isinstance(backbone, SwinTransformer)
        cls = type(backbone)
        changed = [m for m in REPRODUCED if getattr(cls, m) is not getattr(SwinTransformer, m)]
        if changed:
            raise UserError(f"timm {cls.__name__} changes SwinTransformer's "
                            f"{', '.join(changed)}: the Swin splitter cannot cut it")
        return backbone

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        swin = self.check(backbone)
        units: list[nn.Module] = [SwinUnit(swin.patch_embed, first=True)]
        for stage in swin.layers:
            blocks = list(stage.blocks)
            units.append(SwinUnit(nn.Sequential(stage.downsample, blocks[0])))
            units.extend(SwinUnit(b) for b in blocks[1:])
        return units

    def classifier(self, backbone: nn.Module) -> nn.Module:
        swin = self.check(backbone)
        return SwinUnit(nn.Sequential(swin.norm, swin.head), last=True)
