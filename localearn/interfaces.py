"""The three interfaces a plugin implements: `LocalModuleSplitter`, `AuxHead`, `UpdateRule`.

A training step in localearn, for any rule:

1. the engine hands a batch to `UpdateRule.train_step`, which runs the forward passes and every
   backward pass of the rule, leaving gradients in ``.grad``;
2. the engine takes one optimizer step over the backbone and all auxiliary parameters;
3. the engine calls `UpdateRule.after_step` (EMA updates and the like).

The network the rule trains is a `SplitNetwork`: K gradient-isolated local modules made by a
`LocalModuleSplitter`. Module K-1 ends with the backbone's own classifier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from localearn.errors import UserError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DataInfo:
    """What a head needs to know about the data: classes, input shape (C, H, W), normalisation,
    and the class names in label order (empty when the dataset has none)."""

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    def denormalize(self, images: Tensor) -> Tensor:
        """Undo the input normalisation: the image as it was, in [0, 1]."""
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0)


class SplitNetwork(nn.Module):
    """A backbone cut into K local modules; ``forward`` equals the unsplit backbone's forward.

    ``units`` are the backbone's units in order (stem first), shared with the modules, so a
    rule can look up or copy later blocks; ``unit_ranges[i]`` lists the units of module i.
    ``feature_shapes[i]`` is the output shape (C, H, W) of module i for i < K-1.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        classifier: nn.Module,
        cuts: Sequence[int],
        input_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        bounds = [0, *cuts, len(units)]
        self.unit_ranges = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        groups: list[nn.Module] = []
        for i, r in enumerate(self.unit_ranges):
            parts = [units[j] for j in r]
            if i == len(self.unit_ranges) - 1:
                parts.append(classifier)
            groups.append(nn.Sequential(*parts))
        self.local_modules = nn.ModuleList(groups)
        self.units = list(units)  # plain list: the parameters are registered once, above
        self.input_shape = input_shape
        self.unit_shapes = self._trace_shapes(input_shape)
        self.feature_shapes = [self.unit_shapes[r[-1]] for r in self.unit_ranges[:-1]]

    @property
    def k(self) -> int:
        return len(self.local_modules)

    def _trace_shapes(self, input_shape: tuple[int, int, int]) -> list[Shape]:
        """Output shape of every unit, found by one forward pass on a dummy batch."""
        was_training = self.training
        self.eval()
        shapes: list[Shape] = []
        param = next(self.parameters())
        with torch.no_grad():
            x = torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype)
            for unit in self.units:
                x = unit(x)
                shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes

    def forward(self, x: Tensor) -> Tensor:
        for module in self.local_modules:
            x = module(x)
        return x


class LocalModuleSplitter(ABC):
    """Cuts one backbone family into units and groups them into K local modules.

    Implement `accepts`, `units` and `classifier`. Units are the smallest pieces a cut may fall
    between (the stem, then each residual block); the classifier (pooling and the final linear
    layer) is appended to the last module. Override `cuts` for a policy other than even grouping.
    """

    description: ClassVar[str] = ""

    @abstractmethod
    def accepts(self, backbone: nn.Module) -> bool:
        """True when this splitter knows how to cut ``backbone``."""

    @abstractmethod
    def units(self, backbone: nn.Module) -> list[nn.Module]:
        """The backbone's units in forward order, the stem first."""

    @abstractmethod
    def classifier(self, backbone: nn.Module) -> nn.Module:
        """What runs after the last unit to give logits (pooling, flatten, linear)."""

    def cuts(self, num_units: int, k: int, policy: str = "even") -> list[int]:
        """Unit indices where modules 1..K-1 start. ``even``: sizes differ by at most one,
        the larger modules last (early units carry the largest activations)."""
        if policy != "even":
            raise UserError(f"unknown split policy {policy!r} for {type(self).__name__}; "
                            "valid: even")
        small, extra = divmod(num_units, k)
        sizes = [small] * (k - extra) + [small + 1] * extra
        out, pos = [], 0
        for size in sizes[:-1]:
            pos += size
            out.append(pos)
        return out

    def split(
        self,
        backbone: nn.Module,
        k: int,
        input_shape: tuple[int, int, int],
        policy: str = "even",
    ) -> SplitNetwork:
        units = self.units(backbone)
        if not 1 <= k <= len(units):
            raise UserError(f"K={k} is out of range for this model: valid K is 1..{len(units)} "
                            f"({len(units)} units, the stem counted)")
        return SplitNetwork(units, self.classifier(backbone), self.cuts(len(units), k, policy),
                            input_shape)


class AuxHead(nn.Module, ABC):
    """An auxiliary network on a module boundary. It owns its local loss.

    Built from the feature shape (C, H, W) at the boundary and the `DataInfo`; ``loss`` gets the
    module's output, the labels and the (normalised) input images, for rules that reconstruct.
    """

    def __init__(self, shape: Shape, info: DataInfo) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.info = info

    @abstractmethod
    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        """The scalar local loss of this head on ``features``."""


@dataclass
class StepResult:
    """What one training step reports: the final classifier's loss and logits, local losses."""

    loss: float
    logits: Tensor
    local_losses: list[float] = field(default_factory=list)


class UpdateRule(ABC):
    """A training rule: which losses exist, which parameters each may reach, and their backward.

    Options come from the rule expression as keyword arguments of ``__init__`` with type hints
    (``dgl(width=2)`` calls ``DGL(width=2)``); positional arguments are nested rules, which is
    how a decorator rule such as ``mlaan(dgl)`` receives its base.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: set by the engine: scales a loss before backward (fp16 gradient scaling); None = as is
    loss_scale: Callable[[Tensor], Tensor] | None = None
    #: set by the engine: told when a group of parameters has its final gradient for this step
    #: (multi-GPU training starts their all-reduce then); None = nobody listens
    grads_ready: Callable[[list[nn.Parameter]], None] | None = None

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Back-propagate one loss; rules call this rather than ``loss.backward()``."""
        (self.loss_scale(loss) if self.loss_scale else loss).backward(retain_graph=retain_graph)

    def notify_grads_ready(self, params: list[nn.Parameter]) -> None:
        """Rules call this once ``params`` will receive no more gradient in this step."""
        if self.grads_ready is not None:
            self.grads_ready(params)

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        """The auxiliary module returned by `setup`, split by role for memory reports
        (``heads``, ``copies``, ``twins``...); the default counts everything as heads."""
        return {"heads": aux}

    def num_modules(self, requested: int | None, num_units: int) -> int:
        """The K to train with, given the user's request (None: the rule's default)."""
        return num_units if requested is None else requested

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        """Build the auxiliary networks for ``net``; return them as one module (its trainable
        parameters join the optimizer, its state joins checkpoints)."""
        return nn.ModuleList()

    @abstractmethod
    def train_step(self, net: SplitNetwork, images: Tensor, targets: Tensor) -> StepResult:
        """Run the forward and all backward passes of one batch; do not step the optimizer."""

    def after_step(self) -> None:
        """Called after every optimizer step (EMA updates and the like)."""


class LocalRule(UpdateRule):
    """The plain local-learning loop, shared by DGL, InfoPro and any head-based rule.

    Module i runs on the detached output of module i-1; for i < K-1 its output feeds
    ``make_head(i, ...)``'s loss, module K-1 is trained by cross-entropy on the backbone's own
    logits. Each loss is back-propagated at once, so a module's graph is freed before the next
    module runs. A subclass only implements `make_head`.
    """

    def __init__(self) -> None:
        self.heads: nn.ModuleList = nn.ModuleList()

    @abstractmethod
    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        """The auxiliary head of module ``index`` (0 <= index < num_modules - 1)."""

    def configure(self, net: SplitNetwork) -> None:
        """Learn what is needed about ``net`` before heads are made (e.g. which backbone it is,
        for per-model defaults). `setup` calls it first; a decorator rule that calls `make_head`
        itself (MLAAN) calls it too. The default does nothing."""

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        self.configure(net)
        self.heads = nn.ModuleList(
            self.make_head(i, net.k, shape, info) for i, shape in enumerate(net.feature_shapes)
        )
        return self.heads

    def losses(
        self, net: SplitNetwork, images: Tensor, targets: Tensor
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(loss_i, output_i)`` module by module; the caller back-propagates each loss
        before asking for the next (module i's input is detached)."""
        x = images
        for i, module in enumerate(net.local_modules):
            out = module(x.detach())
            if i < net.k - 1:
                yield self.heads[i].loss(out, targets, images), out
            else:
                yield nn.functional.cross_entropy(out, targets), out
            x = out

    def train_step(self, net: SplitNetwork, images: Tensor, targets: Tensor) -> StepResult:
        local: list[float] = []
        for i, (loss, out) in enumerate(self.losses(net, images, targets)):
            self.backward(loss)
            local.append(loss.item())
            logits = out
            params = list(net.local_modules[i].parameters())
            if i < len(self.heads):
                params += list(self.heads[i].parameters())
            self.notify_grads_ready(params)
        return StepResult(loss=local[-1], logits=logits.detach(), local_losses=local[:-1])
