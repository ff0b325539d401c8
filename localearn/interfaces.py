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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from localearn.context import PlainContext, StepContext, StepResult
from localearn.errors import UserError
from localearn.losses import cross_entropy, hard_labels
from localearn.network import Shape, SplitNetwork

__all__ = ["AuxHead", "DataInfo", "HeadFactory", "LocalModuleSplitter", "LocalRule",
           "PlainContext", "Shape", "SplitNetwork", "StepContext", "StepResult", "UpdateRule",
           "cross_entropy", "hard_labels", "parse_cut_list"]


@dataclass(frozen=True)
class DataInfo:
    """What a head needs to know about the data: classes, input shape (C, H, W), normalisation,
    the class names in label order (empty when the dataset has none) and the dataset's
    registered name (rules may key per-dataset defaults on it)."""

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    name: str = ""  # the registered dataset name, "" when unknown (synthetic batches)

    def denormalize(self, images: Tensor) -> Tensor:
        """Undo the input normalisation: the image as it was, in [0, 1]."""
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0)


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
        the larger modules last (early units carry the largest activations).
        ``cuts:3,5,8``: exactly these starts (`SplitNetwork.cuts`' meaning; unit 0 is the stem),
        which fixes K at one more than their number. A subclass adding policies of its own
        hands every other policy to this method."""
        explicit = parse_cut_list(policy, num_units)
        if explicit is not None:
            if len(explicit) + 1 != k:
                n = len(explicit) + 1
                raise UserError(f"split {policy!r} makes {n} modules, not K={k}; give K={n} "
                                f"(--k {n})")
            return explicit
        if policy != "even":
            raise UserError(f"unknown split policy {policy!r} for {type(self).__name__}; "
                            "valid: even, cuts:<unit>,<unit>,...")
        small, extra = divmod(num_units, k)
        sizes = [small] * (k - extra) + [small + 1] * extra
        out, pos = [], 0
        for size in sizes[:-1]:
            pos += size
            out.append(pos)
        return out

    def implied_k(self, policy: str, num_units: int) -> int | None:
        """The K a split policy fixes by itself (``cuts:3,5,8``: 4), or None when the policy
        works for any K. `build_network` can use it when the user leaves K out."""
        explicit = parse_cut_list(policy, num_units)
        return None if explicit is None else len(explicit) + 1

    def split(
        self,
        backbone: nn.Module,
        k: int,
        input_shape: tuple[int, int, int],
        policy: str = "even",
        model_name: str = "",
    ) -> SplitNetwork:
        units = self.units(backbone)
        if not 1 <= k <= len(units):
            raise UserError(f"K={k} is out of range for this model: valid K is 1..{len(units)} "
                            f"({len(units)} units, the stem counted)")
        return SplitNetwork(units, self.classifier(backbone), self.cuts(len(units), k, policy),
                            input_shape, model_name=model_name, split=policy, backbone=backbone)


def parse_cut_list(policy: str, num_units: int) -> list[int] | None:
    """The unit indices of an explicit split ``cuts:3,5,8`` (where modules 1.. start), checked
    against ``num_units``; None when ``policy`` is not an explicit cut list."""
    if not policy.startswith("cuts:"):
        return None
    try:
        cuts = [int(c) for c in policy[len("cuts:"):].split(",") if c.strip()]
    except ValueError:
        raise UserError(f"split {policy!r}: expected unit indices such as cuts:3,5,8") from None
    if any(b <= a for a, b in zip(cuts, cuts[1:])) or any(not 0 < c < num_units for c in cuts):
        raise UserError(f"split {policy!r}: the unit indices where modules 1.. start must be "
                        f"strictly increasing and lie in 1..{num_units - 1} (unit 0 is the "
                        f"stem; this model has {num_units} units)")
    return cuts


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

    def compile_parts(self) -> list[nn.Module]:
        """The modules that do this head's work, for ``--compile``: the head itself when it
        has a ``forward``, else its direct children (a head whose ``loss`` calls several
        networks, such as InfoPro's decoder and classifier, overrides this)."""
        if type(self).forward is not nn.Module.forward:
            return [self]
        return list(self.children())


@runtime_checkable
class HeadFactory(Protocol):
    """What a decorator rule such as MLAAN needs of its base: heads, made for a network."""

    def configure(self, net: SplitNetwork) -> None: ...

    def make_head(self, index: int, num_modules: int, shape: Shape,
                  info: DataInfo) -> AuxHead: ...


class UpdateRule(ABC):
    """A training rule: which losses exist, which parameters each may reach, and their backward.

    Options come from the rule expression as keyword arguments of ``__init__`` with type hints
    (``dgl(width=2)`` calls ``DGL(width=2)``); positional arguments are nested rules, which is
    how a decorator rule such as ``mlaan(dgl)`` receives its base. The engine calls, in order:
    `num_modules`, `configure` (once the network exists), `setup`, then per batch `train_step`
    (with a `StepContext`), its own optimizer step, and `after_step`. See docs/plugins.md.
    """

    description: ClassVar[str] = ""

    @property
    def expression(self) -> str:
        """The rule expression this rule was built from (`localearn.expr.build` sets it)."""
        return getattr(self, "_expression", None) or type(self).__name__.lower()

    @expression.setter
    def expression(self, text: str) -> None:
        self._expression = text

    def num_modules(self, requested: int | None, num_units: int) -> int:
        """The K to train with, given the user's request (None: the rule's default)."""
        return num_units if requested is None else requested

    def configure(self, net: SplitNetwork) -> None:
        """Learn what is needed about ``net`` before any head is made (which backbone it is,
        how it was split: ``net.model_name``, ``net.split``). `build_network` calls it; the
        default does nothing."""

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        """Build the auxiliary networks for ``net``; return them as one module (its trainable
        parameters join the optimizer, its state joins checkpoints)."""
        return nn.ModuleList()

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        """The auxiliary module returned by `setup`, split by role for memory reports; the
        role names are the rule's (MLAAN: ``heads``, ``copies``, ``twins``). The default counts
        everything as ``heads``."""
        return {"heads": aux}

    def compile_targets(self, net: SplitNetwork, aux: nn.Module) -> list[nn.Module]:
        """The modules ``--compile`` compiles in place: every module that does work in a step.
        The default: the local modules and each auxiliary child's `AuxHead.compile_parts`."""
        out: list[nn.Module] = list(net.local_modules)
        for module in aux.modules():
            if isinstance(module, AuxHead):
                out.extend(module.compile_parts())
        return out

    @abstractmethod
    def train_step(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                   targets: Tensor) -> StepResult:
        """Run the forward and all backward passes of one batch through ``ctx``; do not step
        the optimizer."""

    def after_step(self) -> None:
        """Called after every optimizer step (EMA updates and the like)."""

    # -- pipelined stages (``fit --stages N``): each stage runs this rule's own `train_step`
    # -- on the modules ``ctx.modules(K)`` gives it
    def stage_check(self, ranges: list[range], mode: str, precision: str) -> str | None:
        """None when this rule trains on pipelined stages holding the modules ``ranges`` (one
        range per stage, in order) in ``mode`` (sync or async) at ``precision``; else why
        not, in one line. The default refuses: a rule says it runs on stages by overriding
        this (and `stage_parts`)."""
        return (f"{self.expression} is neither built on LocalRule's step nor says it runs on "
                "stages (UpdateRule.stage_check)")

    def stage_parts(self, modules: range) -> list[nn.Module | nn.Parameter]:
        """The auxiliary modules (and loose parameters) that train with ``modules`` on a
        pipelined stage: the stage steps, averages and broadcasts them with its own."""
        return []

    #: True for a rule whose stages all train the same batch in the same step, moving
    #: activations and gradients between stages itself (over `StepContext.stage_place`'s
    #: group); the engine then hands each batch down the stages before the step and no stage
    #: steps unless all may. False: stage s trains batch t while stage s+1 trains batch t-1.
    stage_lockstep: ClassVar[bool] = False

    #: True for a rule whose one loss trains every module (end-to-end back-propagation):
    #: ``--clip-grad`` then clips one norm over all of them, as end-to-end recipes do
    end_to_end: ClassVar[bool] = False

    def microbatch_check(self, microbatches: int, stages: int) -> str | None:
        """None when this rule trains with ``--microbatches`` ``microbatches`` on ``stages``
        stages (1: one process); else why not, in one line. The default takes 1 only: a rule
        that cuts its batch into `StepContext.microbatches` overrides this."""
        if microbatches == 1:
            return None
        return (f"{self.expression} trains each batch whole; --microbatches applies to rules "
                "that cut a batch into microbatches (UpdateRule.microbatch_check)")

    def units_read(self, modules: range) -> list[int]:
        """Backbone units (indices into ``net.units``) whose current weights this rule's
        work for ``modules`` reads, wherever they train (MLAAN's EMA twins follow later
        blocks). A pipelined stage receives the ones another stage trains after every
        optimizer step (a step late in async mode), before `after_step`."""
        return []

    def flush(self, ctx: StepContext) -> None:
        """Called before a pipelined run brings its stages together (evaluation, checkpoints,
        the end of an epoch): take whatever this rule's async mode left in flight."""

    def state_dict(self) -> dict[str, Any]:
        """State outside the auxiliary module's parameters and buffers (plain values or
        tensors), saved in checkpoints; the default has none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    # -- for rules written against the old ``train_step(net, images, targets)`` (deprecated):
    # -- the engine lends them its context while their step runs
    @contextmanager
    def legacy_context(self, ctx: StepContext) -> Iterator[None]:
        """The engine's context, lent for one step to a rule written against the old
        ``train_step(net, images, targets)`` (its ``self.backward`` calls go through it)."""
        self._legacy_ctx = ctx
        try:
            yield
        finally:
            self._legacy_ctx = None

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Deprecated: use ``ctx.backward(loss)`` in ``train_step(ctx, ...)``."""
        (getattr(self, "_legacy_ctx", None) or PlainContext()).backward(
            loss, retain_graph=retain_graph)

    def notify_grads_ready(self, params: list[nn.Parameter]) -> None:
        """Deprecated: use ``ctx.grads_ready(params)`` in ``train_step(ctx, ...)``."""
        (getattr(self, "_legacy_ctx", None) or PlainContext()).grads_ready(params)


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

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        self.configure(net)  # again, for a network not made by build_network
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
        for i in range(net.k):
            loss, x = self.module_loss(net, i, x, images, targets)
            yield loss, x

    @property
    def pipelinable(self) -> bool:
        """True if a step of this rule is exactly `module_loss` module by module, so pipelined
        training (``--stages``) may run the modules in different processes. A subclass that
        replaces `train_step` or `losses` is not, unless it says so."""
        cls = type(self)
        return cls.train_step is LocalRule.train_step and cls.losses is LocalRule.losses

    def stage_check(self, ranges: list[range], mode: str, precision: str) -> str | None:
        return None if self.pipelinable else super().stage_check(ranges, mode, precision)

    def stage_parts(self, modules: range) -> list[nn.Module | nn.Parameter]:
        return [self.heads[i] for i in modules if i < len(self.heads)]

    def module_loss(self, net: SplitNetwork, index: int, x: Tensor, images: Tensor,
                    targets: Tensor) -> tuple[Tensor, Tensor]:
        """Module ``index`` on the detached ``x`` (the previous module's output, or the
        images): ``(its loss, its output)``. The head's loss for index < K-1, cross-entropy on
        the backbone's logits for the last."""
        out = net.local_modules[index](x.detach())
        if index < net.k - 1:
            return self.heads[index].loss(out, targets, images), out
        return cross_entropy(out, targets), out

    def train_step(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                   targets: Tensor) -> StepResult:
        if type(self).losses is not LocalRule.losses:  # a subclass's own loss sequence
            return self._step_over_losses(ctx, net, images, targets)
        local: list[Tensor] = []
        x, loss, out = images, None, None
        for i in ctx.modules(net.k):
            loss, out = self.module_loss(net, i, ctx.enter(i, x), images, targets)
            ctx.leave(i, out)  # on to the next stage, before this module's backward
            ctx.backward(loss)
            params = list(net.local_modules[i].parameters())
            if i < len(self.heads):
                params += list(self.heads[i].parameters())
                local.append(loss.detach())
            ctx.grads_ready(params)
            x = out
        if out is None:
            raise RuntimeError("train_step: this process trains no module")
        last = ctx.modules(net.k).stop == net.k
        return StepResult(loss=loss.detach() if last else None,
                          logits=out.detach() if last else None, local_losses=local)

    def _step_over_losses(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                          targets: Tensor) -> StepResult:
        local: list[Tensor] = []
        for i, (loss, out) in enumerate(self.losses(net, images, targets)):
            ctx.backward(loss)
            local.append(loss.detach())
            logits = out
            params = list(net.local_modules[i].parameters())
            if i < len(self.heads):
                params += list(self.heads[i].parameters())
            ctx.grads_ready(params)
        return StepResult(loss=local[-1], logits=logits.detach(), local_losses=local[:-1])
