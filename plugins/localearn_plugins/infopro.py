"""InfoPro (Wang et al., ICLR 2021): each local module keeps the information of its input.

Module i (i < K-1) is trained by ``ixx_i * reconstruction + ixy_i * task``: a decoder rebuilds
the (de-normalised) input image from the module's output under binary cross-entropy, and a
``1c2f`` classifier head scores the output with the supervised contrastive loss (``contrast``,
InfoPro's default) or cross-entropy (``ce``, the paper's "InfoPro (Softmax)"). Both weights
ramp linearly from module 0 (``ixx_1``, ``ixy_1``) to module K-2 (``ixx_2``, ``ixy_2``); the
last module is trained by the backbone's own classifier, as in every local rule.

Weights the user leaves out come from the public InfoPro settings for the dataset, the model and
K (`DEFAULTS`). A head whose weight is 0 is not built; a module with both weights 0 gets an
empty head whose loss is 0 (the public code's ``0 * BCE + 0 * CE``), refused by InfoPro alone
but allowed under MLAAN, whose cascades still train the module.

``ramp=module`` (default) is InfoPro's index / (K-2). ``ramp=stage`` is the public MLAAN+InfoPro
code's (`stage_ratios`): the stage of the module's last block over the public code's K-2, so
at ResNet-32 K=16 with ixx 5 -> 0, ixy 0.5 -> 0 the weights are 4.62, 4.23, 3.85 and 0.46,
0.42, 0.38 over the three stages and no head is empty (``ramp=module``: 0 at module 14).

The decoder and classifier networks and `InfoProHead` live in `localearn_plugins.infopro_heads`
(re-exported here); this module holds the rule, its public default weights and their ramp.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from localearn.errors import UserError
from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape, SplitNetwork
from localearn.models.token_grid import TokenGrid, on_grid, require_grid, token_grid
from localearn_plugins.infopro_heads import (  # noqa: F401  (re-exported)
    HEAD_PATTERN,
    Decoder,
    DecoderKind,
    InfoProHead,
    LossMode,
    make_classifier,
    resize,
    supcon_loss,
)

Ramp = Literal["module", "stage"]

#: (ixx_1, ixx_2, ixy_1, ixy_2) of the public InfoPro scripts (``comand.sh``), by dataset,
#: model and K. ``resnet110*`` is InfoPro* (the memory-balanced split). K=2 has one head, so
#: only the ``_1`` values matter there. The scripts hold ResNet-32 settings for CIFAR-10 only,
#: and InfoPro* settings for CIFAR-10 and STL-10 only; `settings_for` says what stands in.
Ends = tuple[float, float, float, float]
DEFAULTS: dict[str, dict[str, dict[int, Ends]]] = {
    "cifar10": {
        "resnet32": {2: (5, 5, 1, 1), 4: (6, 1, 0, 2), 8: (5, 0, 0, 2), 16: (5, 0.2, 0.05, 0.5)},
        "resnet110": {2: (5, 5, 0.5, 0.5), 4: (1, 0, 0, 1), 8: (5, 0, 0, 1),
                      16: (5, 0.5, 0, 1)},
        "resnet110*": {2: (5, 5, 0.1, 0.1), 3: (5, 5, 0, 0.1), 4: (5, 5, 0, 0.1)},
    },
    "stl10": {
        "resnet110": {2: (10, 10, 1, 1), 4: (20, 5, 0.2, 2), 8: (20, 5, 0.2, 1),
                      16: (20, 10, 0.5, 0.1)},
        "resnet110*": {2: (20, 20, 1, 1), 3: (20, 5, 0.5, 2), 4: (20, 10, 0.5, 1)},
    },
    "svhn": {
        "resnet110": {2: (1, 1, 0.1, 0.1), 4: (5, 0.5, 0, 1), 8: (5, 0.5, 0, 2),
                      16: (5, 0.5, 0.2, 1)},
    },
}
#: the table used for a backbone InfoPro published no settings for (on the same dataset)
FALLBACK_MODEL = "resnet110"
#: the dataset assumed when the data is none of InfoPro's
FALLBACK_DATASET = "cifar10"


def settings_for(model: str | None, dataset: str) -> tuple[str, str]:
    """The ``(dataset, model)`` row of `DEFAULTS` serving ``model`` on ``dataset``, the first
    that exists of: the pair; the plain model for InfoPro* (``resnet110*``); the dataset's
    ResNet-110 row (the weights depend more on the data than on the depth); the same on
    CIFAR-10, for data InfoPro has no settings for."""
    for data in dict.fromkeys((dataset if dataset in DEFAULTS else FALLBACK_DATASET,
                               FALLBACK_DATASET)):
        rows = DEFAULTS[data]
        for name in (model, (model or "").rstrip("*"), FALLBACK_MODEL):
            if name in rows:
                return data, name
    raise AssertionError("unreachable: the fallback row exists")


_DIGITS = tuple(str(d) for d in range(10))
_STL10 = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def identify_dataset(info: DataInfo) -> str:
    """Which of InfoPro's datasets ``info`` describes: its ``name`` if any (``cifar10-shards``
    is ``cifar10``); else 96x96 images or STL-10's classes are ``stl10``, digits normalised
    with mean = std = 0.5 ``svhn``, anything else ``cifar10``."""
    name = str(getattr(info, "name", "") or getattr(info, "dataset", "")).lower()
    if name:
        base = name.split("-")[0]
        return base if base in DEFAULTS else FALLBACK_DATASET
    if tuple(info.input_shape[1:]) == (96, 96) or tuple(info.class_names) == _STL10:
        return "stl10"
    half = (0.5,) * len(info.mean)
    if tuple(info.class_names) == _DIGITS and info.mean == half and info.std == half:
        return "svhn"
    return FALLBACK_DATASET


def ramp(first: float, last: float, index: int, num_modules: int) -> float:
    """Linear from ``first`` at module 0 to ``last`` at module K-2 (``first`` when K=2)."""
    r = index / (num_modules - 2) if num_modules > 2 else 0.0
    return first * (1 - r) + last * r


def unit_stages(shapes: list[Shape]) -> list[int]:
    """The stage of every unit: 0 for unit 0 (the stem), 1 from unit 1 on, one more at every
    unit whose output shape differs from the previous unit's (a later stage's first block)."""
    stages = [0]
    for u in range(1, len(shapes)):
        stages.append(1 if u == 1 else stages[-1] + int(shapes[u] != shapes[u - 1]))
    return stages


def stage_ratios(net: SplitNetwork) -> list[float]:
    """The public MLAAN+InfoPro code's ramp ratio of every module of ``net``: the stage of the
    module's last unit over (K' - 2), 0 when K' <= 2. K' counts modules as the public code does,
    without a module that holds the stem alone (its ResNet-32 "K=15" is K=16 here)."""
    stages = unit_stages(list(net.unit_shapes))
    k = net.k - int(net.k > 1 and len(net.unit_ranges[0]) == 1)
    return [stages[r[-1]] / (k - 2) if k > 2 else 0.0 for r in net.unit_ranges]


def identify(net: SplitNetwork) -> str | None:
    """The `DEFAULTS` model key for ``net``: its registry model name when InfoPro published
    settings for it (on any dataset), ``resnet110*`` for a ResNet-110 under the memory-balanced
    split at a K InfoPro* published (its own cut points); else None."""
    rows = {name: set(table) for data in DEFAULTS.values() for name, table in data.items()}
    model = net.model_name if net.model_name in rows else None
    if model and net.split == "balanced" and net.k in rows.get(model + "*", set()):
        return model + "*"
    return model


class InfoPro(LocalRule):
    """InfoPro: decoder + contrastive (or CE) head per module, weights ramped over depth.

    Options (any left out takes the public InfoPro value for the dataset, model and K,
    `DEFAULTS`; the dataset comes from the `DataInfo` the heads are made with):
    ``loss`` contrast|ce; ``ixx_1``/``ixx_2`` reconstruction weight of module 0 / K-2;
    ``ixy_1``/``ixy_2`` task weight; ``head`` classifier config (``1c2f``); ``widen`` head
    width factor; ``feature_dim`` projection and hidden width; ``temperature`` for SupCon;
    ``decoder`` auto|upsample|progressive; ``ramp`` module (InfoPro's: module index / (K-2))
    or stage (the public MLAAN+InfoPro code's, `stage_ratios`).
    """

    description = ("InfoPro: image reconstruction + supervised contrastive head per module, "
                   "linearly ramped weights (ICLR 2021)")

    def __init__(self, loss: LossMode = "contrast", ixx_1: float | None = None,
                 ixx_2: float | None = None, ixy_1: float | None = None,
                 ixy_2: float | None = None, head: str = "1c2f", widen: float = 1.0,
                 feature_dim: int = 128, temperature: float = 0.07,
                 decoder: DecoderKind = "auto", ramp: Ramp = "module") -> None:
        super().__init__()
        if ramp not in ("module", "stage"):
            raise ValueError(f"ramp must be module or stage (got {ramp!r})")
        for key, value in (("ixx_1", ixx_1), ("ixx_2", ixx_2), ("ixy_1", ixy_1),
                           ("ixy_2", ixy_2)):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number >= 0 (got {value})")
        if widen <= 0 or temperature <= 0 or feature_dim < 1:
            raise ValueError("widen and temperature must be positive and feature_dim >= 1 "
                             f"(got widen={widen}, temperature={temperature}, "
                             f"feature_dim={feature_dim})")
        if HEAD_PATTERN.fullmatch(head) is None:
            raise ValueError(f"head must look like 1c2f (<convs>c<linear layers>f), got {head!r}")
        self.loss_mode: LossMode = loss
        self.given = {"ixx_1": ixx_1, "ixx_2": ixx_2, "ixy_1": ixy_1, "ixy_2": ixy_2}
        self.head, self.widen, self.feature_dim = head, widen, feature_dim
        self.temperature, self.decoder = temperature, decoder
        self.ramp = ramp
        self.ratios: list[float] | None = None  # `stage_ratios`, set by `configure`
        self.model: str | None = None  # set by `configure`; picks the row of `DEFAULTS`
        self.dataset = FALLBACK_DATASET  # set from the DataInfo by `setup` / `make_head`
        self.grid: TokenGrid | None = None  # a transformer's patch grid, set by `configure`
        self.model_name = ""

    def configure(self, net: SplitNetwork) -> None:
        """Learn which backbone ``net`` is and how it was split, for the per-model defaults
        (`build_network` calls it, before any head is made)."""
        self.model = identify(net)
        self.ratios = stage_ratios(net)
        self.grid = token_grid(net)
        self.model_name = net.model_name

    def ramp_ends(self, num_modules: int) -> dict[str, float]:
        """``ixx_1, ixx_2, ixy_1, ixy_2`` in force for K = ``num_modules``: the user's values,
        the rest from `DEFAULTS` for the dataset and model (`settings_for`) at the nearest
        tabulated K (the larger on a tie)."""
        data, model = settings_for(self.model, self.dataset)
        table = DEFAULTS[data][model]
        k = min(table, key=lambda t: (abs(t - num_modules), -t))
        defaults = dict(zip(("ixx_1", "ixx_2", "ixy_1", "ixy_2"), table[k]))
        return {key: float(defaults[key] if value is None else value)
                for key, value in self.given.items()}

    def weights(self, index: int, num_modules: int) -> tuple[float, float]:
        """``(ixx, ixy)`` of module ``index`` out of ``num_modules``."""
        ends = self.ramp_ends(num_modules)
        if self.ramp == "module":
            return (ramp(ends["ixx_1"], ends["ixx_2"], index, num_modules),
                    ramp(ends["ixy_1"], ends["ixy_2"], index, num_modules))
        if self.ratios is None or len(self.ratios) != num_modules:
            raise RuntimeError("infopro(ramp=stage) needs the network first (configure)")
        r = self.ratios[index]
        ixx, ixy = (ends[f"{w}_1"] * (1 - r) + ends[f"{w}_2"] * r for w in ("ixx", "ixy"))
        if ixx < 0 or ixy < 0:
            raise UserError(f"infopro(ramp=stage): module {index} of {num_modules} gets ixx="
                            f"{ixx:g}, ixy={ixy:g} (ratio {r:g} > 1 extrapolates the ramp); "
                            "use ramp=module or a larger K")
        return ixx, ixy

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        """InfoPro alone: every module i < K-1 is trained by its head only, so a module whose
        two weights are both 0 is a `UserError` (under MLAAN it is not: see the module doc)."""
        self.configure(net)
        self.dataset = identify_dataset(info)
        for i in range(net.k - 1):
            ixx, ixy = self.weights(i, net.k)
            if ixx <= 0 and ixy <= 0:
                ends = self.ramp_ends(net.k)
                raise UserError(f"infopro: module {i} of {net.k} gets ixx=0 and ixy=0 (ramps "
                                f"ixx {ends['ixx_1']}->{ends['ixx_2']}, ixy {ends['ixy_1']}->"
                                f"{ends['ixy_2']}), so nothing would train it; make one of its "
                                "weights positive (under mlaan its cascades train it)")
        return super().setup(net, info)

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        if len(shape) == 2:  # (T, D) tokens: the decoder and classifier see the patch grid
            grid = require_grid(self.grid, "rule 'infopro'", "its decoder needs the patch "
                                "tokens on a fixed grid", self.model_name, shape)
            return on_grid(self.make_head(index, num_modules, grid.map_shape(shape), info),
                           grid, shape)
        self.dataset = identify_dataset(info)
        ixx, ixy = self.weights(index, num_modules)
        return InfoProHead(shape, info, ixx, ixy, self.loss_mode, self.head, self.widen,
                           self.feature_dim, self.temperature, self.decoder)
