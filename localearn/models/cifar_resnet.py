"""CIFAR ResNet-32/110 (He et al. 2016): a 3x3 stem, three stages of BasicBlocks at widths
16/32/64, global pooling and a linear classifier. Also registered with timm, so
``timm.create_model("resnet32")`` builds the same network once localearn is imported.
"""

from __future__ import annotations

from timm.models import register_model
from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import LocalModuleSplitter
from localearn.network import SplitNetwork
from localearn.partition import min_max_cuts

__all__ = ["BasicBlock", "CifarResNet", "CifarResNetSplitter", "init_weights", "resnet32",
           "resnet110"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def init_weights(module: nn.Module) -> None:
    """He normal (fan-out) for every convolution, BatchNorm at weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks`` BasicBlocks per stage (5: ResNet-32, 18: ResNet-110)."""

    def __init__(self, blocks: int, num_classes: int = 10, widths=(16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for s, width in enumerate(widths):
            layer = [BasicBlock(cin if b == 0 else width, width, 2 if (s > 0 and b == 0) else 1)
                     for b in range(blocks)]
            stages.append(nn.Sequential(*layer))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(widths[-1], num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x)


def _drop_timm_kwargs(kwargs: dict) -> dict:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return kwargs


@register_model
def resnet32(pretrained: bool = False, num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32: stem + 15 BasicBlocks (16 units, K=1..16), 0.46M parameters."""
    if pretrained:
        raise ValueError("no pretrained weights exist for resnet32")
    return CifarResNet(5, num_classes, **_drop_timm_kwargs(kwargs))


@register_model
def resnet110(pretrained: bool = False, num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110: stem + 54 BasicBlocks (55 units, K=1..55), 1.7M parameters."""
    if pretrained:
        raise ValueError("no pretrained weights exist for resnet110")
    return CifarResNet(18, num_classes, **_drop_timm_kwargs(kwargs))


class CifarResNetSplitter(LocalModuleSplitter):
    """CIFAR ResNet: units are the stem and each BasicBlock; the pooled classifier ends the net.

    Split policies: ``even`` and ``cuts:<unit>,...`` (the base class's), ``balanced``
    (InfoPro*'s memory-balanced split) and ``public`` (the cut points of the public MLAAN and
    InfoPro code, `PUBLIC_SPLITS`)."""

    def accepts(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, CifarResNet)

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        assert isinstance(backbone, CifarResNet)
        return [backbone.stem, *backbone.layer1, *backbone.layer2, *backbone.layer3]

    def classifier(self, backbone: nn.Module) -> nn.Module:
        assert isinstance(backbone, CifarResNet)
        return backbone.head

    def cuts(self, num_units: int, k: int, policy: str = "even") -> list[int]:
        """``balanced``: the published InfoPro* cut points for ResNet-110 at K=2, 3, 4 and
        otherwise the split that minimises the largest module's activation memory (see
        `balanced_cuts`). ``public``: `PUBLIC_SPLITS` (K=1 is always the whole network).
        Any other policy goes to the base class (``even``, ``cuts:...``)."""
        if policy == "public":
            return public_cuts(num_units, k)
        if policy == "balanced":
            if k in BALANCED_PRESETS.get(num_units, {}):
                return list(BALANCED_PRESETS[num_units][k])
            return balanced_cuts(unit_costs(num_units), k)
        if policy == "even" or policy.startswith("cuts:"):
            return super().cuts(num_units, k, policy)
        raise UserError(f"unknown split policy {policy!r} for CIFAR ResNets; valid: even, "
                        "balanced, public, cuts:<unit>,<unit>,...")

    def split(self, backbone: nn.Module, k: int, input_shape: tuple[int, int, int],
              policy: str = "even", model_name: str = "") -> SplitNetwork:
        """As the base class; ``balanced`` on 96x96 inputs (STL-10) takes InfoPro*'s STL-10
        cut points where they differ from CIFAR-10's (`BALANCED_PRESETS_STL10`)."""
        units = self.units(backbone)
        stl = BALANCED_PRESETS_STL10.get(len(units), {}).get(k)
        if policy == "balanced" and tuple(input_shape[1:]) == (96, 96) and stl is not None:
            return SplitNetwork(units, self.classifier(backbone), list(stl), input_shape,
                                model_name=model_name, split=policy)
        return super().split(backbone, k, input_shape, policy, model_name)


#: InfoPro*'s published memory-balanced cuts (unit index where each module starts, the stem is
#: unit 0), by unit count and K: ResNet-110 only, from the public InfoPro code's configs
#: (``InfoPro_balanced_memory['resnet110']['cifar10']``).
BALANCED_PRESETS: dict[int, dict[int, tuple[int, ...]]] = {
    55: {2: (16,), 3: (11, 22), 4: (8, 16, 28)},
}
#: InfoPro*'s STL-10 cuts where they differ from CIFAR-10's (K=3: blocks 9 / 11 / 34).
BALANCED_PRESETS_STL10: dict[int, dict[int, tuple[int, ...]]] = {55: {3: (10, 21)}}


def _starts(ends: list[int]) -> tuple[int, ...]:
    """Module starts from the public configs' "last unit of each module" lists."""
    return tuple(e + 1 for e in ends)


#: The cut points of the public code (unit index where modules 1.. start; unit 0 is the stem),
#: by unit count (16: ResNet-32, 55: ResNet-110) and K. From the MLAAN repository's
#: ``config2.py``, whose entries for K <= 16 are InfoPro's ``configs.py`` ones. The public code
#: keeps the stem outside its modules, so its ResNet-32 "K=15" and ResNet-110 "K=54" (one
#: block per module) are the paper's K=16 and K=55 here, the stem a module of its own; at every
#: other K the stem rides with module 0, as it does here. ResNet-110 K=32 is MLAAN's per-stage
#: split (11 + 11 + 10 modules of 1 or 2 blocks).
PUBLIC_SPLITS: dict[int, dict[int, tuple[int, ...]]] = {
    16: {
        2: _starts([7]),
        3: _starts([5, 10]),
        4: _starts([3, 7, 11]),
        8: _starts([1, 3, 5, 7, 9, 11, 13]),
        16: tuple(range(1, 16)),
    },
    55: {
        2: _starts([27]),
        3: _starts([18, 36]),
        4: _starts([12, 26, 40]),
        8: _starts([5, 12, 19, 26, 33, 40, 47]),
        16: _starts([2, 5, 8, 11, 14, 17, 20, 23, 26, 30, 34, 38, 42, 46, 50]),
        32: _starts([2, 3, 5, 6, 8, 10, 12, 14, 15, 17, 18,
                     20, 21, 23, 24, 26, 28, 30, 32, 33, 35, 36,
                     38, 40, 41, 43, 44, 46, 48, 50, 52]),
        55: tuple(range(1, 55)),
    },
}


def public_cuts(num_units: int, k: int) -> list[int]:
    """`PUBLIC_SPLITS`' cuts for this unit count and K; a `UserError` naming the supported ones
    otherwise."""
    if k == 1:
        return []
    table = PUBLIC_SPLITS.get(num_units, {})
    if k not in table:
        supported = "; ".join(f"{_MODEL_OF_UNITS[n]} K={', '.join(map(str, sorted(t)))}"
                              for n, t in PUBLIC_SPLITS.items())
        raise UserError(f"split 'public' has no cut points for K={k} of a {num_units}-unit "
                        f"CIFAR ResNet; the public code has: {supported}")
    return list(table[k])


_MODEL_OF_UNITS = {16: "resnet32", 55: "resnet110"}


def unit_costs(num_units: int) -> list[int]:
    """Relative activation size (C*H*W of the output) of each unit of a CIFAR ResNet with
    ``num_units`` units: 4 for the stem and stage 1 (16x32x32), 2 for stage 2, 1 for stage 3."""
    n, rest = divmod(num_units - 1, 3)
    if rest or n < 1:
        raise UserError(f"{num_units} units is not a CIFAR ResNet (1 + 3n units expected)")
    return [4] * (1 + n) + [2] * n + [1] * n


def balanced_cuts(costs: list[int], k: int) -> list[int]:
    """Cuts grouping units with ``costs`` into ``k`` modules so that the costliest module is as
    cheap as possible; among such splits, the one whose cuts come earliest (later modules take
    as many of the cheap late units as the bound allows)."""
    if not 1 <= k <= len(costs):
        raise UserError(f"K={k} is out of range: valid K is 1..{len(costs)}")
    return min_max_cuts(costs, k)
