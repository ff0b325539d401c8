"""AugLocal (Ma, Wu, Si and Tan, ICLR 2024): augmented auxiliary networks.

The auxiliary net of local module i is a stack of freshly initialised blocks shaped like
uniformly sampled later layers of the backbone (always including the last one), then global
average pooling and a linear classifier, trained with cross-entropy; its gradient reaches module
i and its own auxiliary net only. The number of sampled layers shrinks linearly toward the
output (the pyramidal depth, coefficient ``tau``).

The K relation: with ``merge_tail=true`` (the default, as the public code trains) the last
``d + 1`` of the K modules train as one module by the final loss, so the network has ``K - d``
gradient-isolated modules (the public code's ``local_module_num - aux_net_depth``); with
``merge_tail=false`` all K modules are gradient-isolated and K - 1 of them have an AugLocal
head. See docs/auglocal.md.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import (
    AuxHead,
    DataInfo,
    LocalRule,
    Shape,
    StepContext,
    StepResult,
    cross_entropy,
)
from localearn.models.cifar_resnet import BasicBlock, init_weights
from localearn.network import SplitNetwork
from localearn_plugins.linear import TokenMean


def sampled_layers(last: int, num_units: int, depth: int) -> list[int]:
    """The later units whose shapes the auxiliary net of a module ending at unit ``last``
    takes: all of them when there are at most ``depth``, else ``round(last + (N - last - 1) *
    j / depth)`` for j = 1..depth (ties to even, as Python's ``round`` in the public code),
    which always ends with the last unit N - 1."""
    later = num_units - 1 - last
    if depth >= later:
        return list(range(last + 1, num_units))
    return [round(last + Fraction(later * j, depth)) for j in range(1, depth + 1)]


def pyramid_depth(d: int, tau: float, index: int, num_local: int) -> int:
    """Depth of the auxiliary net of local module ``index`` (0-based) out of ``num_local``:
    ``max(1, round(d * (1 - tau * i / (K' - 2)) + tau * i / (K' - 2)))`` with K' - 2 =
    num_local - 1, i.e. linear from d at the first module to ``d - (d - 1) * tau`` at the last
    one (ties to even). Computed exactly, so no float error can move a tie."""
    if num_local <= 1:
        return d
    ratio = Fraction(tau) * Fraction(index, num_local - 1)
    return max(1, round(d * (1 - ratio) + ratio))


def _block_kinds() -> tuple[type, ...]:
    from timm.models import resnet as timm_resnet

    return BasicBlock, timm_resnet.BasicBlock, timm_resnet.Bottleneck


def make_block(like: nn.Module, cin: int, cout: int, stride: int) -> nn.Module:
    """A fresh residual block of ``like``'s kind from ``cin`` to ``cout`` channels: localearn's
    CIFAR `BasicBlock`, or timm's BasicBlock / Bottleneck (with a 1x1 convolution and BN on
    the shortcut when the shape changes)."""
    if isinstance(like, BasicBlock):
        return BasicBlock(cin, cout, stride)
    kind = type(like)
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                 nn.BatchNorm2d(cout))
    return kind(cin, cout // kind.expansion, stride, shortcut)


class AugLocalHead(AuxHead):
    """Fresh blocks of the backbone's kind shaped like the sampled units (``layers``' output
    shapes), then global average pooling, BatchNorm1d when the requested ``depth`` is at most
    1 (as the public code does), and ``Linear(C, classes)``; cross-entropy.

    A block has the target unit's width and stride 2 while the spatial size is larger than the
    target's: at most one stride 2 per block, as in the public code, so a block that skips a
    stage leaves the rest of the down-sampling to the next block (or to the pooling)."""

    def __init__(self, shape: Shape, info: DataInfo, layers: list[int], units: list[nn.Module],
                 unit_shapes: list[Shape], depth: int) -> None:
        super().__init__(shape, info)
        self.layers, self.depth = list(layers), depth
        c, h = shape[0], shape[1]
        blocks: list[nn.Module] = []
        for u in layers:
            width, height = unit_shapes[u][0], unit_shapes[u][1]
            stride = 2 if h > height else 1
            blocks.append(make_block(units[u], c, width, stride))
            c, h = width, math.ceil(h / stride)
        self.blocks = nn.Sequential(*blocks)
        norm = [nn.BatchNorm1d(c)] if depth <= 1 else []
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *norm,
                                        nn.Linear(c, info.num_classes))
        init_weights(self.blocks)  # the backbone's initialisation

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.blocks(features))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return cross_entropy(self(features), targets)


def fresh_copy(unit: nn.Module) -> nn.Module:
    """A transformer block shaped like ``unit`` with fresh weights: its linear layers drawn as
    timm draws a ViT's (truncated normal, std 0.02, zero bias), its norms reset."""
    from timm.models.vision_transformer import init_weights_vit_timm

    block = copy.deepcopy(unit).requires_grad_(True)
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            init_weights_vit_timm(module, name)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
    return block


class AugLocalTokenHead(AuxHead):
    """AugLocal on a (T, D) token boundary: fresh copies of the sampled later transformer
    blocks (every block keeps the (T, D) shape, so any of them can follow any module), then the
    final LayerNorm, the average over the tokens and ``Linear(D, classes)``; cross-entropy."""

    def __init__(self, shape: Shape, info: DataInfo, layers: list[int], units: list[nn.Module],
                 depth: int) -> None:
        super().__init__(shape, info)
        self.layers, self.depth = list(layers), depth
        self.blocks = nn.Sequential(*(fresh_copy(units[u]) for u in layers))
        self.classifier = nn.Sequential(nn.LayerNorm(shape[1], eps=1e-6), TokenMean(),
                                        nn.Linear(shape[1], info.num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.blocks(features))

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return cross_entropy(self(features), targets)


class AugLocal(LocalRule):
    """AugLocal: an auxiliary net of ``d`` fresh blocks shaped like uniformly sampled later
    layers per local module, its depth shrinking linearly toward the output (``tau``).

    Options: ``d`` (>= 1) the largest auxiliary depth, in blocks; ``tau`` in [0, 1] the
    pyramid coefficient (0: every auxiliary net has depth d; 1: down to 1 block);
    ``merge_tail`` (default true) trains the last d + 1 modules as one by the final loss."""

    description = ("AugLocal: auxiliary nets of fresh blocks shaped like sampled later layers, "
                   "pyramidal depth (ICLR 2024)")

    def __init__(self, d: int = 2, tau: float = 0.5, merge_tail: bool = True) -> None:
        super().__init__()
        if d < 1:
            raise ValueError(f"d must be at least 1 (got {d}): it is the auxiliary net's depth "
                             "in blocks (a pooled linear head is the rule 'linear')")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1] (got {tau})")
        self.d, self.tau, self.merge_tail = d, tau, merge_tail
        self.plan: list[tuple[list[int], int]] = []  # (sampled units, depth) per local module

    def num_local(self, num_modules: int) -> int:
        """How many modules have an AugLocal head: K - d - 1 with the merged tail, else K - 1."""
        return max(num_modules - 1 - (self.d if self.merge_tail else 0), 0)

    def num_modules(self, requested: int | None, num_units: int) -> int:
        k = num_units if requested is None else requested
        if self.merge_tail and k - self.d < 2:
            raise UserError(f"auglocal(d={self.d}) trains the last d+1={self.d + 1} modules as "
                            f"one (merge_tail=true), so K must be at least d+2={self.d + 2} "
                            f"(got K={k}); lower d or set merge_tail=false")
        return k

    def configure(self, net: SplitNetwork) -> None:
        shapes = net.unit_shapes
        self.tokens = len(shapes[0]) == 2  # a ViT's (T, D) boundaries
        other = [u for u in net.units[1:] if not isinstance(u, _block_kinds())]
        if self.tokens and any(s != shapes[0] for s in shapes[:-1]):
            raise UserError(f"auglocal copies later transformer blocks, which needs every "
                            f"boundary of {net.model_name or 'this model'} to have one shape "
                            f"(got {sorted(set(shapes[:-1]))})")
        if other and not self.tokens:
            name = net.model_name or "this model"
            raise UserError(f"auglocal builds its auxiliary blocks as ResNet blocks, or copies "
                            f"ViT blocks; {name} has {type(other[0]).__name__} units on feature "
                            "maps (supported: resnet32, resnet110, resnet34, resnet101, "
                            "resnet152, and ViT/DeiT models)")
        self._units = list(net.units)  # a plain list: the blocks' kinds, never trained here
        self._last_units = [r[-1] for r in net.unit_ranges]
        self._unit_shapes = list(net.unit_shapes)
        self._num_local = self.num_local(net.k)

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        depth = pyramid_depth(self.d, self.tau, index, self._num_local)
        layers = sampled_layers(self._last_units[index], len(self._unit_shapes), depth)
        if len(shape) == 2:
            # the last unit (the final block, ending in the classifier's module) is a block too
            return AugLocalTokenHead(shape, info, layers, self._units, depth)
        return AugLocalHead(shape, info, layers, self._units, self._unit_shapes, depth)

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        self.configure(net)  # again, for a network not made by build_network
        self.heads = nn.ModuleList(self.make_head(i, net.k, net.feature_shapes[i], info)
                                   for i in range(self._num_local))
        self.plan = [(h.layers, h.depth) for h in self.heads]
        return self.heads

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        return {"heads": nn.ModuleList(h.classifier for h in aux),
                "blocks": nn.ModuleList(h.blocks for h in aux)}

    @property
    def pipelinable(self) -> bool:
        return not self.merge_tail  # then every module is local: LocalRule's step

    def train_step(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                   targets: Tensor) -> StepResult:
        if not self.merge_tail:
            return super().train_step(ctx, net, images, targets)
        # modules 0..n-1 are local (input detached, own head); modules n..K-1 run end to end
        # and the final cross-entropy trains them together
        n = len(self.heads)
        local: list[Tensor] = []
        x = images
        for i, module in enumerate(net.local_modules):
            x = module(x.detach() if i <= n else x)
            if i < n:
                loss = self.heads[i].loss(x, targets, images)
                ctx.backward(loss)
                local.append(loss.detach())
                ctx.grads_ready([*module.parameters(), *self.heads[i].parameters()])
        loss = cross_entropy(x, targets)
        ctx.backward(loss)
        ctx.grads_ready([p for m in net.local_modules[n:] for p in m.parameters()])
        return StepResult(loss=loss.detach(), logits=x.detach(), local_losses=local)
