"""Where pipelined stages cut the K modules: the process layout, cuts given on the command line
or balanced by measured time, and whether a rule can train on stages at all.

Balancing times each module as a stage of its own would run it: the rule's own `train_step`
on that one module (`StepContext.modules`), the input a dummy forward gives it, what would come
back from a next stage replaced by zeros. So the cost of a module includes its heads, what the
rule attaches to it (MLAAN's leap-augmented module) and the passes of cascades that cross it,
with nothing rule-specific here. `localearn.engine.stage_costs` times the modules in
interleaved rounds and picks the cut that is best across the rounds, so noise does not flip it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from localearn import distributed as dist_
from localearn.errors import SameOnEveryRank, UserError
from localearn.interfaces import PlainContext, SplitNetwork, UpdateRule


class StageLost(UserError):
    """Another process of a pipelined job stopped (or could not be reached)."""


@dataclass(frozen=True)
class Layout:
    """Where a process stands: ``stages`` x ``replicas`` processes, rank = stage * D + replica."""

    stages: int
    replicas: int
    rank: int

    @property
    def stage(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return stage * self.replicas + (self.replica if replica is None else replica)


def layout_of(stages: int, env: dist_.DistEnv) -> Layout:
    if not env.enabled:
        raise SameOnEveryRank(
            f"--stages {stages} runs one process per stage: start it with `localearn fit "
            f"--stages {stages}` (torchrun underneath), or under torchrun with a multiple of "
            f"{stages} processes")
    if env.world_size % stages:
        raise SameOnEveryRank(f"--stages {stages} needs a multiple of {stages} processes; "
                              f"the job has {env.world_size}")
    return Layout(stages, env.world_size // stages, env.rank)


def parse_stage_cuts(text: str, k: int | None, stages: int) -> list[int]:
    """``"4,9"``: the modules where stages 1.. start (strictly increasing, within 1..K-1, one
    fewer than the stages). ``k=None`` checks all but the upper bound."""
    def bad(why: str) -> SameOnEveryRank:
        return SameOnEveryRank(f"invalid --stage-cuts {text!r}: {why}")

    try:
        cuts = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise bad("expected the module indices where stages 1.. start, e.g. 4,9") from None
    if len(cuts) != stages - 1:
        raise bad(f"{stages} stages need {stages - 1} cut(s), got {len(cuts)}")
    top = k if k is not None else max(cuts, default=0) + 1
    if any(b <= a for a, b in zip([0, *cuts], [*cuts, top])):
        within = f"1..{k - 1} (K={k})" if k is not None else "1..K-1"
        raise bad(f"cuts must increase strictly within {within}, so every stage has at least "
                  "one module")
    return cuts


def stage_ranges(starts: list[int], k: int) -> list[range]:
    bounds = [0, *starts, k]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def check_pipelinable(rule: UpdateRule, k: int | None, stages: int, *,
                      starts: list[int] | None = None, mode: str = "sync",
                      precision: str = "32") -> UpdateRule:
    """The rule, if ``--stages`` can train it (``k=None``: K not known yet; ``starts``: the
    cuts, when known); else one line saying why not (`UpdateRule.stage_check`)."""
    ranges = stage_ranges(starts, k) if starts is not None and k is not None else []
    why = rule.stage_check(ranges, mode, precision)
    if why:
        raise SameOnEveryRank(f"--stages trains rules that run on stages: {why}; train it "
                              "without --stages")
    if k is not None and k < stages:
        raise SameOnEveryRank(f"--stages {stages} needs at least {stages} local modules; "
                              f"{rule.expression} trains K={k}")
    return rule


def balance(costs: list[float], stages: int) -> list[int]:
    """Contiguous groups of modules with the smallest largest-group cost; the modules where
    groups 1.. start."""
    k = len(costs)
    if not 1 <= stages <= k:
        raise ValueError(f"cannot make {stages} stages of {k} modules")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max cost splitting modules 0..i-1 into s groups; cut[s][i]: its last
    # group's start
    best = [[inf] * (k + 1) for _ in range(stages + 1)]
    cut = [[0] * (k + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, k + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    starts, i = [], k
    for s in range(stages, 0, -1):
        i = cut[s][i]
        starts.append(i)
    return sorted(starts)[1:]


def cuda_sync() -> None:
    """Wait for queued CUDA work (nothing without CUDA), so wall times include it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """The median wall time of ``fn()`` after one untimed call (CUDA synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        cuda_sync()
        start = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class _AloneContext(PlainContext):
    """A `StepContext` that makes one module a stage of its own: its input from a dummy
    forward, nothing sent, zeros for what a next stage would send back."""

    def __init__(self, index: int, x: Tensor) -> None:
        self.index, self.x = index, x

    def modules(self, k: int) -> range:
        return range(self.index, self.index + 1)

    def enter(self, index: int, x: Tensor) -> Tensor:
        return self.x if index == self.index else x

    def send_back(self, grad: Tensor) -> None:
        pass

    def take_back(self, like: Tensor) -> Tensor:
        return torch.zeros_like(like)


def module_steps(rule: UpdateRule, net: SplitNetwork,
                 batch: int = 32) -> list[Callable[[], object]]:
    """One call per module that runs it as a stage of its own through the rule's own step, on
    copies of the rule and network (so nothing of the run changes) and random inputs. Each
    call holds its module's input (one batch's activations at each module boundary), so the
    calls can be timed in any order."""
    rule, net = copy.deepcopy((rule, net))
    device = next(net.parameters()).device
    images = torch.randn(batch, *net.input_shape, device=device)
    targets = torch.zeros(batch, dtype=torch.long, device=device)
    convs = [p for p in net.parameters() if p.dim() == 4]
    if convs and not convs[0].is_contiguous() and \
            convs[0].is_contiguous(memory_format=torch.channels_last):
        images = images.contiguous(memory_format=torch.channels_last)
    steps, x = [], images
    for i, module in enumerate(net.local_modules):
        ctx = _AloneContext(i, x.detach())
        steps.append(lambda ctx=ctx: rule.train_step(ctx, net, images, targets))
        with torch.no_grad():
            x = module(x)
    return steps


def module_costs(rule: UpdateRule, net: SplitNetwork, batch: int = 32) -> list[float]:
    """The measured time of each module as a stage of its own (`module_steps`), each timed on
    its own (`timed`). FLOPs would miss what dominates small feature maps on CPUs (batch norm,
    activations, memory traffic)."""
    return [timed(step) for step in module_steps(rule, net, batch)]


def plan_cuts(cfg, rule: UpdateRule, net: SplitNetwork, env: dist_.DistEnv) -> list[int]:
    """The modules where stages 1.. start: ``cfg.stage_cuts``, or balanced by time measured on
    rank 0 (times differ between processes; `stage_costs.measured_cuts`) and broadcast, so
    every process cuts alike."""
    if cfg.stage_cuts:
        return parse_stage_cuts(cfg.stage_cuts, net.k, cfg.stages)
    starts = None
    if env.is_main:
        from localearn.engine.stage_costs import measured_cuts  # it imports this module

        starts = measured_cuts(rule, net, cfg.stages, min(cfg.batch_size, 128))
    try:
        return dist_.broadcast_object(starts, env)
    except RuntimeError:
        raise StageLost(f"rank {env.rank} lost its peers while the stage cuts were measured: "
                        "another process of this pipelined job stopped; every stage "
                        "stops") from None
