"""What a training recipe adds to the one `Step` (docs/training.md#recipes): RandAugment and
mixup/cutmix of each training batch, the loss settings every rule's cross-entropy follows,
gradient-norm clipping and an exponential moving average of the weights for evaluation.

The pieces are timm's and torch's: ``timm.data.Mixup`` (soft targets, smoothed by it),
torchvision's ``RandAugment``, ``torch.nn.utils.clip_grad_norm_`` and
``timm.utils.ModelEmaV3``. Every random draw comes from the process's global RNGs (numpy for
mixup's mixing weight and box, torch for RandAugment), which checkpoints save, so a resumed run
draws what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from localearn.interfaces import DataInfo
from localearn.losses import LossRecipe

__all__ = ["BatchRecipe", "StepRecipe", "WeightEma", "make_step_recipe"]


class BatchRecipe:
    """RandAugment (two ops at ``magnitude``, per image, after the dataset's own crop and flip:
    timm's order) and timm's ``Mixup`` for mixup/cutmix (one mixing weight per batch, each image
    paired with its mirror in the batch, targets made soft and smoothed by
    ``label_smoothing``). Takes and returns normalised image batches."""

    def __init__(self, info: DataInfo, *, mixup: float = 0.0, cutmix: float = 0.0,
                 label_smoothing: float = 0.0, randaugment: int | None = None) -> None:
        from timm.data import Mixup

        self.info, self.num_classes, self.smoothing = info, info.num_classes, label_smoothing
        self.mixer = None if mixup <= 0 and cutmix <= 0 else Mixup(
            mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
            num_classes=info.num_classes)
        self.augment = None
        if randaugment is not None:
            from torchvision.transforms import v2

            self.augment = v2.RandAugment(num_ops=2, magnitude=randaugment)

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.augment is not None and len(images):
            images = self._randaugment(images)
        if self.mixer is not None and len(images):
            if len(images) % 2:  # a last partial batch of odd size: smoothed, not mixed
                from timm.data.mixup import mixup_target

                return images, mixup_target(targets, self.num_classes, 1.0, self.smoothing)
            images, targets = self.mixer(images, targets)
        return images, targets

    def _randaugment(self, images: Tensor) -> Tensor:
        """Back to the uint8 pixels the dataset normalised, RandAugment image by image (each
        its own two ops), normalised again."""
        shape = (1, -1, 1, 1)
        mean = images.new_tensor(self.info.mean or (0.0,)).view(shape)
        std = images.new_tensor(self.info.std or (1.0,)).view(shape)
        pixels = ((images.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        out = torch.stack([self.augment(img) for img in pixels])
        out = ((out.float() / 255 - mean) / std).to(images.dtype)
        if images.dim() == 4 and not images.is_contiguous() and \
                images.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # as it came
        return out


class WeightEma(nn.Module):
    """An exponential moving average of a network's weights and float buffers
    (``timm.utils.ModelEmaV3`` at a fixed ``decay``), for evaluation; its state dict is the
    averaged network's, saved in checkpoints as ``ema``."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        super().__init__()
        from timm.utils import ModelEmaV3

        self.decay = decay
        self.ema = ModelEmaV3(net, decay=decay)

    @property
    def module(self) -> nn.Module:
        """The averaged network (in eval mode)."""
        return self.ema.module

    def update(self, net: nn.Module) -> None:
        self.ema.update(net)

    def restart(self, net: nn.Module) -> None:
        """Start the average again from ``net``'s current weights."""
        self.ema.set(net)


@dataclass
class StepRecipe:
    """The recipe's part in one `Step`: the batch transform (None: none), the loss settings,
    the clipping norm with the groups of parameters clipped together, the weight average."""

    batch: BatchRecipe | None = None
    loss: LossRecipe = field(default_factory=LossRecipe)
    clip_grad: float | None = None
    clip_groups: list[list[nn.Parameter]] = field(default_factory=list)
    ema: WeightEma | None = None

    def clip(self) -> None:
        """Clip each group's gradient to ``clip_grad`` in norm (gradients unscaled already)."""
        if self.clip_grad is None:
            return
        for group in self.clip_groups:
            torch.nn.utils.clip_grad_norm_(group, self.clip_grad)


def make_step_recipe(cfg: Any, info: DataInfo, clip_groups: list[list[nn.Parameter]],
                     ema: WeightEma | None = None) -> StepRecipe:
    """The `StepRecipe` of a `FitConfig`."""
    batch = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.randaugment is not None:
        batch = BatchRecipe(info, mixup=cfg.mixup, cutmix=cfg.cutmix,
                            label_smoothing=cfg.label_smoothing, randaugment=cfg.randaugment)
    return StepRecipe(batch, LossRecipe(cfg.label_smoothing), cfg.clip_grad, clip_groups, ema)
