"""MLAAN (Zhang et al.): multilaminar local modules and leap-augmented modules over any base rule.

Modules 0..K-1; the last is trained by the backbone's classifier. As the paper's section III-B
defines them, a cascade is k consecutive modules (the first f_1..f_k, the next f_2..f_k+1, ...),
and its auxiliary network sits after the cascade's last module. So, by default:

- independent loss, for every module i < K-1: the base rule's head on module i's output;
  reaches module i and that head;
- cascade loss, for every module i with k-1 <= i < K-1 (the modules that end a cascade):
  modules i-k+1..i, then the leap-augmented module LAM_i, then a cascade head of the base
  rule's kind; reaches those modules, LAM_i's trained copies and that head;
- module i's objective is ``wx * independent + wy * cascade`` (the paper's eta_d, eta_c), and
  ``wx * independent`` alone for i < k-1: eq. (5) gives every module the same eta_d on its
  independent term, and modules before the first cascade's end have no cascade head (they are
  still reached by every cascade that contains them);
- the final cross-entropy reaches the last min(k, K) modules.

With ``short_cascades=true`` (the first reading of localearn, kept as an option) every module
i < K-1 ends a cascade, the early ones shortened to modules max(0, i-k+1)..i, so that every
module gets k cascade signals. docs/mlaan.md quotes the sentences of the paper behind each
reading.

LAM_i holds trained copies of up to p later backbone blocks (the leap policy picks them, or an
explicit table: ``leaps='2:6,11,15; 3:6,11'`` or ``leaps=public``, the public code's tables);
the first copy (every copy with ``ema_blocks=all``) adds the output of an EMA twin of the same
real block, ``twin = r * twin + (1 - r) * real`` after every optimizer step. Twins get no
gradient but pass gradients through; twins of the same real block are one module.
``twins=public_last`` and ``twins=public_all`` are the public code's updates instead (only the
last leap-augmented module's twins, or every twin, before the optimizer step, parameters
only): see `localearn_plugins.mlaan_twins`.

Everything made per cascade (``blocks``, ``copies``, ``cascade_heads``) is indexed by the
cascade's position; ``cascades[c]`` is the module that ends cascade c (with
``short_cascades=true``, c itself).

Unlike the public code, every backbone module runs forward once per step: the graphs of the last
k modules are kept and each cascade's gradient is routed back through them, a graph freed once no
later cascade needs it. ``recompute=true`` trades compute for memory: no module graph is kept (a
module's first forward runs without one, and every backward pass through it runs it forward
again from its kept input with the same random state, BatchNorm statistics put back afterwards),
and each LAM block keeps only its input and is run again in its backward (activation
checkpointing, its BatchNorm buffers put back afterwards). That costs up to k extra forwards of
every module and one of every LAM. By default (``checkpoint_leap=largest``) only the first leap
of the LAMs beside the largest module graphs is checkpointed that way, where the step's peak
falls: one more forward of those leaps. Fixed here against the
public code: every module's twin is updated by default (not only the last; ``twins=public_last``
keeps the public CIFAR code's), no loss is discarded, every module i < K-1 has its independent
loss, and the cascade depth is the paper's k.

Where the parts live: this module holds the options and `MLAAN.setup` (cascades, heads, LAMs
and twins) and the ablations `MLM` and `LAM`; the training step is
`localearn_plugins.mlaan_step`, the pipelined-stage hooks `localearn_plugins.mlaan_stages`, the
leap tables `localearn_plugins.mlaan_leaps` and the twins' update `localearn_plugins.mlaan_twins`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from localearn.errors import UserError
from localearn.interfaces import DataInfo, HeadFactory, SplitNetwork, UpdateRule
from localearn_plugins.mlaan_leaps import (  # noqa: F401  (re-exported)
    PUBLIC_LEAPS,
    leap_blocks,
    parse_leaps,
    public_leaps,
)
from localearn_plugins.mlaan_stages import MLAANStages
from localearn_plugins.mlaan_step import MLAANStep
from localearn_plugins.mlaan_twins import (
    TwinMode,
    check_mode,
    ema_update,
    keys_to_update,
    twin_key,
)


def _leap(block: nn.Module, twin: nn.Module | None, z: Tensor) -> Tensor:
    """One step of a LAM: a trained copy, plus its EMA twin's output where it has one."""
    return block(z) if twin is None else block(z) + twin(z)


@contextlib.contextmanager
def _buffers_kept(*modules: nn.Module | None) -> Iterator[None]:
    """Put the modules' buffers back as they were on entry: a forward run again for a backward
    pass (activation checkpointing) leaves BatchNorm statistics as one forward left them."""
    buffers = [b for m in modules if m is not None for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, old in zip(buffers, saved):
                b.copy_(old)


def _checkpointed(block: nn.Module, z: Tensor) -> Tensor:
    """``block(z)`` keeping only ``z``: its activations are rebuilt in the backward pass, with
    the same random state, and its buffers put back afterwards."""
    rerun = partial(_buffers_kept, block)
    return checkpoint(block, z, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), rerun()))


def _leap_checkpointed(block: nn.Module, twin: nn.Module | None, z: Tensor) -> Tensor:
    """`_leap` keeping only its input; the copy and the twin are checkpointed one by one, so
    that the backward rebuilds (and frees) one of them at a time."""
    out = _checkpointed(block, z)
    return out if twin is None else out + _checkpointed(twin, z)


class MLAAN(MLAANStep, MLAANStages, UpdateRule):
    """MLAAN over a base rule: cascades of depth k plus leap-augmented auxiliary networks."""

    description = ("MLAAN: multilaminar cascades of depth k and leap-augmented modules over a "
                   "base rule, e.g. mlaan(dgl)")

    def __init__(self, base: HeadFactory, k: int = 3, wx: float = 0.001, wy: float = 0.999,
                 ema: float = 0.995, p: int = 4, ema_blocks: Literal["first", "all"] = "first",
                 leaps: str | None = None, fuse: bool = True, recompute: bool = False,
                 short_cascades: bool = False, twins: TwinMode = "paper",
                 checkpoint_leap: Literal["largest", "all", "off"] = "largest") -> None:
        if not isinstance(base, HeadFactory):
            raise ValueError(f"the base rule {getattr(base, 'expression', base)!r} has no "
                             "auxiliary heads; use a local rule such as dgl or infopro")
        if k < 1:
            raise ValueError(f"k must be at least 1 (got {k})")
        if p < 0:
            raise ValueError(f"p must be at least 0 (got {p})")
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"ema must lie in [0, 1] (got {ema})")
        if checkpoint_leap not in ("largest", "all", "off"):
            raise ValueError("checkpoint_leap must be one of largest, all, off (got "
                             f"{checkpoint_leap!r})")
        self.base, self.k, self.wx, self.wy = base, k, wx, wy
        self.ema, self.p, self.ema_blocks, self.fuse = ema, p, ema_blocks, fuse
        self.recompute, self.short_cascades = recompute, short_cascades
        self.checkpoint_leap = checkpoint_leap
        self._rerun_first: set[int] = set()  # cascades whose first leap is checkpointed
        self.twin_mode = check_mode(twins)
        self.public_leaps = bool(leaps) and leaps.strip().lower() == "public"
        self.leap_table = parse_leaps(leaps) if leaps and not self.public_leaps else {}
        self.cascades: list[int] = []  # the module that ends each cascade, set by `setup`
        self.trace: list[str] = []  # names of the loss being back-propagated (for tests)
        # not an option: a subclass without independent heads (MAN) sets it False
        self.independent = True

    def cascade_ends(self, num_modules: int) -> list[int]:
        """The modules that end a cascade (and so have a cascade head and a LAM): k-1..K-2 as
        the paper defines cascades; 0..K-2 with ``short_cascades``."""
        first = 0 if self.short_cascades else self.k - 1
        return list(range(first, num_modules - 1))

    def num_modules(self, requested: int | None, num_units: int) -> int:
        if isinstance(self.base, UpdateRule):
            return self.base.num_modules(requested, num_units)
        return super().num_modules(requested, num_units)

    def configure(self, net: SplitNetwork) -> None:
        self.base.configure(net)  # e.g. InfoPro's per-model defaults and InfoPro* split

    # -- construction ---------------------------------------------------------------------
    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        K = net.k
        self.base.configure(net)  # again, for a network not made by build_network
        self.cascades = self.cascade_ends(K)
        if K > 1 and not self.cascades:
            warnings.warn(f"mlaan: k={self.k} spans more than the K-1={K - 1} modules before "
                          "the last, so no cascade ends inside the network and only the "
                          f"independent losses train it; valid k for a cascade is 1..{K - 1} "
                          "(or short_cascades=true)", UserWarning, stacklevel=2)
        self._position = {i: c for c, i in enumerate(self.cascades)}
        table = self._leap_table(net)
        self.blocks: list[list[int]] = []
        heads = nn.ModuleList(self.base.make_head(i, K, net.feature_shapes[i], info)
                              for i in range(K - 1) if self.independent)
        cascade_heads, copies = nn.ModuleList(), nn.ModuleList()
        twins = nn.ModuleDict()
        # the key in ``twins`` of each LAM block's twin (None: no twin), and each twin's block
        self.twin_keys: list[list[str | None]] = []
        self.twin_blocks: dict[str, int] = {}
        for i in self.cascades:
            last = net.unit_ranges[i][-1]
            blocks = table.get(i)
            if blocks is None:
                blocks = leap_blocks(net.unit_shapes, last, self.p)
            self._check_chain(net, i, last, blocks)
            self.blocks.append(blocks)
            copies.append(nn.ModuleList(copy.deepcopy(net.units[b]) for b in blocks))
            keys: list[str | None] = []
            for j, b in enumerate(blocks):
                if not (j == 0 or self.ema_blocks == "all"):
                    keys.append(None)
                    continue
                # public_last moves the last LAM's twins only: shared ones get their own
                own = (self.twin_mode == "public_last" and i == self.cascades[-1]
                       and str(b) in twins)
                key = twin_key(b, own)
                if key not in twins:
                    twins[key] = copy.deepcopy(net.units[b]).requires_grad_(False)
                    self.twin_blocks[key] = b
                keys.append(key)
            self.twin_keys.append(keys)
            shape = net.unit_shapes[blocks[-1]] if blocks else net.feature_shapes[i]
            cascade_heads.append(self.base.make_head(i, K, shape, info))
        self.heads, self.cascade_heads = heads, cascade_heads
        self._rerun_first = self._first_leaps_checkpointed(net)
        self.copies, self.twins = copies, twins
        self.units = net.units
        return nn.ModuleDict({"heads": heads, "cascade_heads": cascade_heads, "copies": copies,
                              "twins": twins})

    def _first_leaps_checkpointed(self, net: SplitNetwork) -> set[int]:
        """The cascades whose first leap keeps only its input (``checkpoint_leap``): with
        ``largest``, those that reach a module whose output has as many elements as the
        network's largest module output (their LAM runs beside the largest kept graphs, so
        the step's peak falls there); ``all`` every cascade, ``off`` none."""
        if self.checkpoint_leap == "off":
            return set()
        sizes = [math.prod(shape) for shape in net.feature_shapes]
        return {c for c, i in enumerate(self.cascades)
                if self.checkpoint_leap == "all"
                or max(sizes[max(0, i - self.k + 1):i + 1]) == max(sizes)}

    def _leap_table(self, net: SplitNetwork) -> dict[int, list[int]]:
        """The explicit leap table for ``net`` (empty: the policy everywhere); ``public``'s
        rows for modules that end no cascade here are dropped, a user's are an error."""
        if self.public_leaps:
            return {i: units for i, units in public_leaps(net).items() if i in self._position}
        for i in self.leap_table:
            if not 0 <= i < net.k - 1:
                raise UserError(f"leap table names module {i}, but K={net.k} has modules "
                                f"0..{net.k - 1} and the last one has no LAM")
            if i not in self._position:
                where = (f"modules {self.cascades[0]}..{self.cascades[-1]}" if self.cascades
                         else "no module")
                raise UserError(f"leap table names module {i}, which ends no cascade: with "
                                f"k={self.k} and K={net.k} cascades end at {where} (add "
                                "short_cascades=true for a cascade at every module)")
        return self.leap_table

    def _check_chain(self, net: SplitNetwork, i: int, last: int, blocks: list[int]) -> None:
        shape = net.unit_shapes[last]
        for b in blocks:
            if not last < b < len(net.units) or net.unit_shapes[b - 1] != shape:
                raise UserError(f"leap table for module {i}: unit {b} cannot follow the "
                                f"features {shape} (units after module {i} run "
                                f"{last + 1}..{len(net.units) - 1}, in order)")
            shape = net.unit_shapes[b]

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        return {"heads": nn.ModuleList([aux["heads"], aux["cascade_heads"]]),
                "copies": aux["copies"], "twins": aux["twins"]}

    def compile_targets(self, net: SplitNetwork, aux: nn.Module) -> list[nn.Module]:
        # the local modules and every head's parts (the default), then each trained copy and
        # twin: a LAM calls its blocks one by one
        blocks = [*(b for c in self.copies for b in c), *self.twins.values()]
        return [*super().compile_targets(net, aux), *blocks]

    # -- the leap-augmented module --------------------------------------------------------
    def lam_forward(self, i: int, z: Tensor) -> Tensor:
        """LAM_i (``i`` a module that ends a cascade): the trained copies in order, the twins'
        outputs added where they exist."""
        c = self._position[i]
        for n, (key, block) in enumerate(zip(self.twin_keys[c], self.copies[c])):
            twin = None if key is None else self.twins[key]
            # the first leap (the copy and twin that read module i's output) keeps only its
            # input where `_first_leaps_checkpointed` says, every leap with recompute; the
            # activations are rebuilt in the backward pass
            rerun = self.recompute or (n == 0 and c in self._rerun_first)
            if rerun and torch.is_grad_enabled():
                z = _leap_checkpointed(block, twin, z)
            else:
                z = _leap(block, twin, z)
        return z

    def lam_parameters(self, c: int) -> list[nn.Parameter]:
        """The trained parameters of cascade c's LAM (its copies), final after its loss."""
        return list(self.copies[c].parameters())

    def after_step(self) -> None:
        """EMA (``twins=paper``): ``twin = r * twin + (1 - r) * real`` for every twin, after
        every optimizer step, BatchNorm buffers copied. The public readings update in
        `train_step` instead (`_public_twins`), before the optimizer step."""
        if self.twin_mode == "paper":
            ema_update(((t, self.units[self.twin_blocks[key]]) for key, t in self.twins.items()),
                       self.ema, buffers=True)

    def _public_twins(self, mine: range) -> None:
        """``twins=public_last`` / ``public_all``: the EMA at the end of `train_step`, after
        every backward pass and before the engine's optimizer step (the public code's place),
        parameters only, for the twins of this process's modules."""
        if self.twin_mode == "paper" or not self.cascades:
            return
        by_module = {i: [k for k in keys if k is not None]
                     for i, keys in zip(self.cascades, self.twin_keys)}
        keys = keys_to_update(self.twin_mode, by_module, self.cascades[-1], mine)
        ema_update(((self.twins[k], self.units[self.twin_blocks[k]]) for k in keys), self.ema,
                   buffers=False)


class MLM(MLAAN):
    """Ablation: multilaminar cascades only; the cascade head sits on module i's output."""

    description = "MLAAN ablation: cascades of depth k only, no leap-augmented modules"

    def __init__(self, base: HeadFactory, k: int = 3, wx: float = 0.001,
                 wy: float = 0.999, recompute: bool = False, short_cascades: bool = False) -> None:
        super().__init__(base, k=k, wx=wx, wy=wy, p=0, recompute=recompute,
                         short_cascades=short_cascades)


class LAM(MLAAN):
    """Ablation: leap-augmented modules only; the head on LAM_i(module i) reaches module i."""

    description = "MLAAN ablation: leap-augmented modules only, no cascades (k=1)"

    def __init__(self, base: HeadFactory, wx: float = 0.001, wy: float = 0.999,
                 ema: float = 0.995, p: int = 4, ema_blocks: Literal["first", "all"] = "first",
                 leaps: str | None = None, twins: TwinMode = "paper") -> None:
        super().__init__(base, k=1, wx=wx, wy=wy, ema=ema, p=p, ema_blocks=ema_blocks,
                         leaps=leaps, twins=twins)
