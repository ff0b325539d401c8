"""Vision transformers from timm (ViT, DeiT), and the splitter for timm's VisionTransformer.

Units: the stem (patch embedding, class and register tokens, position embedding, position
dropout, patch dropout and pre-norm: what ``forward_features`` runs before the blocks), then
each transformer block. The final norm, the pooling (class token or average), ``fc_norm``,
``head_drop`` and ``head`` (``forward_head``) end the last module. Module boundaries are token
sequences of shape (N, T, D) (T tokens, the class token first), not (N, C, H, W) feature maps.

The factories build with ``pretrained=False`` and the data's input size (``img_size``):
`build_network` passes the data's ``input_shape`` to every factory that takes one.
``vit_cifar`` is a small ViT for 32x32 inputs; ``vit_tiny``, ``vit_small``, ``deit_tiny`` and
``deit_small`` are timm's ImageNet models built at the data's size.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from localearn.errors import UserError
from localearn.models.timm_any import BlockGroupsSplitter, create
from localearn.models.token_grid import TokenGrid

__all__ = ["TimmViTSplitter", "ViTClassifier", "ViTStem", "deit_small", "deit_tiny",
           "vit_cifar", "vit_small", "vit_tiny"]

Shape3 = tuple[int, int, int] | None


def vit_cifar(num_classes: int = 10, input_shape: Shape3 = None, **kwargs: Any) -> nn.Module:
    """A small ViT for 32x32 inputs: patch 4 (64 tokens and a class token), 6 blocks, width 192,
    3 heads, MLP 768; 2,693,578 parameters for 10 classes. 7 units, K=1..7."""
    config = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
    config.update(kwargs)
    return create("vit_tiny_patch16_224", num_classes, input_shape or (3, 32, 32), config)


def vit_tiny(num_classes: int = 1000, input_shape: Shape3 = None, **kwargs: Any) -> nn.Module:
    """timm ViT-Ti/16 (12 blocks, width 192) at the data's input size: 13 units, K=1..13."""
    return create("vit_tiny_patch16_224", num_classes, input_shape, kwargs)


def vit_small(num_classes: int = 1000, input_shape: Shape3 = None, **kwargs: Any) -> nn.Module:
    """timm ViT-S/16 (12 blocks, width 384) at the data's input size: 13 units, K=1..13."""
    return create("vit_small_patch16_224", num_classes, input_shape, kwargs)


def deit_tiny(num_classes: int = 1000, input_shape: Shape3 = None, **kwargs: Any) -> nn.Module:
    """timm DeiT-Ti/16 (12 blocks, width 192) at the data's input size: 13 units, K=1..13."""
    return create("deit_tiny_patch16_224", num_classes, input_shape, kwargs)


def deit_small(num_classes: int = 1000, input_shape: Shape3 = None, **kwargs: Any) -> nn.Module:
    """timm DeiT-S/16 (12 blocks, width 384) at the data's input size: 13 units, K=1..13."""
    return create("deit_small_patch16_224", num_classes, input_shape, kwargs)


class ViTStem(nn.Module):
    """What a timm VisionTransformer runs before its blocks: patch embedding, prefix tokens
    (class, registers), position embedding, position dropout, patch dropout, pre-norm. It holds
    the backbone's own modules and parameters (shared, not copied)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token  # a Parameter, or None
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.no_embed_class = bool(vit.no_embed_class)
        self.dynamic_img_size = bool(vit.dynamic_img_size)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    def token_grid(self, input_shape: Shape3) -> TokenGrid | None:
        """How the stem's output lays out at ``input_shape`` (C, H, W): the prefix tokens, then
        the patches row by row; None under patch dropout (the token count varies)."""
        if not isinstance(self.patch_drop, nn.Identity) or input_shape is None:
            return None
        if self.dynamic_img_size:
            height, width = self.patch_embed.dynamic_feat_size(tuple(input_shape[1:]))
        else:
            height, width = self.patch_embed.grid_size
        return TokenGrid(self.num_prefix_tokens, int(height), int(width))

    def prefix(self, batch: int) -> list[Tensor]:
        tokens = [t for t in (self.cls_token, self.reg_token) if t is not None]
        return [t.expand(batch, -1, -1) for t in tokens]

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        prefix = self.prefix(x.shape[0])
        if self.pos_embed is None:  # timm skips the position dropout here
            x = torch.cat([*prefix, x.view(x.shape[0], -1, x.shape[-1])], dim=1)
            return self.norm_pre(self.patch_drop(x))
        pos = self.pos_embed
        if self.dynamic_img_size:  # (N, H, W, D) patches: resample the grid to H x W
            from timm.layers import resample_abs_pos_embed

            n, h, w, d = x.shape
            pos = resample_abs_pos_embed(
                pos, new_size=(h, w), old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.view(n, -1, d)
        if self.no_embed_class:  # position added to the patches only, then the prefix
            x = x + pos
            if prefix:
                x = torch.cat([*prefix, x], dim=1)
        else:  # the prefix first, then position over every token
            if prefix:
                x = torch.cat([*prefix, x], dim=1)
            x = x + pos
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class ViTClassifier(nn.Module):
    """A timm VisionTransformer's end: final norm, pooling (attention pool, class token,
    average or max over the tokens), ``fc_norm``, ``head_drop`` and ``head``."""

    POOLS = ("", "token", "avg", "max", "avgmax")

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.norm = vit.norm
        self.attn_pool = vit.attn_pool
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.pool_type = str(vit.global_pool)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.include_prefix = bool(getattr(vit, "pool_include_prefix", False))
        if self.attn_pool is None and self.pool_type not in self.POOLS:
            raise UserError(f"timm ViT pooling {self.pool_type!r} is not supported by the ViT "
                            f"splitter; supported: {', '.join(map(repr, self.POOLS))}")

    def pool(self, x: Tensor) -> Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(x if self.include_prefix else x[:, self.num_prefix_tokens:])
        if self.pool_type == "token":
            return x[:, 0]
        if not self.pool_type:
            return x
        if not self.include_prefix:
            x = x[:, self.num_prefix_tokens:]
        if self.pool_type == "avg":
            return x.mean(dim=1)
        if self.pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.norm(x))
        return self.head(self.head_drop(self.fc_norm(x)))


#: VisionTransformer methods whose work the units reproduce; a subclass overriding any of them
#: (DeiT's distilled models: a distillation token and a second head) is refused
REPRODUCED = ("forward_features", "_pos_embed", "forward_head", "pool")


class TimmViTSplitter(BlockGroupsSplitter):
    """timm VisionTransformer (ViT, DeiT): the stem (patch and position embedding), then one
    unit per block; the final norm, pooling and head end the last module.

    Split policies: ``even``, ``cuts:...`` and ``groups`` (the blocks in K equal groups, the
    stem in the first)."""

    description = "timm ViT and DeiT: stem (patch + position embedding), then one unit per block"

    def accepts(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, VisionTransformer)

    def check(self, backbone: nn.Module) -> VisionTransformer:
        assert isinstance(backbone, VisionTransformer)
        cls = type(backbone)
        changed = [m for m in REPRODUCED
                   if getattr(cls, m, None) is not getattr(VisionTransformer, m, None)]
        if changed:
            raise UserError(f"timm {cls.__name__} changes VisionTransformer's "
                            f"{', '.join(changed)} (DeiT distilled models add a distillation "
                            "token and head): the ViT splitter cannot cut it; use a model "
                            "without 'distilled' in its name")
        return backbone

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        vit = self.check(backbone)
        return [ViTStem(vit), *vit.blocks]

    def classifier(self, backbone: nn.Module) -> nn.Module:
        return ViTClassifier(self.check(backbone))
