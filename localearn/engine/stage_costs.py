"""Stage cuts that timing noise does not flip.

Each module is timed as a stage of its own (`module_steps`) in interleaved rounds: every
module once per round, round after round, after one untimed round. A slow spell of the machine
(another process, a clock change) then slows all the modules of a round a little instead of
every repeat of one module, which would move the cut. Candidate cuts are the balanced cuts of
the per-module medians and of each round, and the cuts next to the first; each is scored on
every round's own times (the share of that round's total in its largest stage) and the cut with
the lowest median share wins. Shares within ``tie`` of each other are equal: then the balanced
cut of the medians, then the smallest cuts, so equal times always give `balance`'s cut.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from statistics import median

import torch
from torch import Tensor

from localearn.interfaces import PlainContext, SplitNetwork, UpdateRule
from localearn.partition import min_max_cuts

#: rounds of timing (after the untimed one): ResNet-32 K=16 at batch 128 takes about a second a
#: round on one CPU thread
ROUNDS = 5


def balance(costs: list[float], stages: int) -> list[int]:
    """Contiguous groups of modules with the smallest largest-group cost; the modules where
    groups 1.. start (equal splits: the earliest cuts)."""
    try:
        return min_max_cuts(costs, stages)
    except ValueError:
        raise ValueError(f"cannot make {stages} stages of {len(costs)} modules") from None


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


def round_costs(steps: Sequence[Callable[[], object]], rounds: int = ROUNDS) -> list[list[float]]:
    """``rounds`` lists of the wall time of every step, timed round-robin (step 0, 1, ..., K-1,
    then again) after one untimed round (CUDA synchronised)."""
    if rounds < 1:
        raise ValueError(f"need at least 1 round, got {rounds}")
    for step in steps:  # warm-up: first-call allocations, lazy initialisation
        step()
    table = []
    for _ in range(rounds):
        row = []
        for step in steps:
            cuda_sync()
            start = time.perf_counter()
            step()
            cuda_sync()
            row.append(time.perf_counter() - start)
        table.append(row)
    return table


def stage_loads(costs: Sequence[float], starts: Sequence[int]) -> list[float]:
    """The summed cost of each stage when stages 1.. start at ``starts``."""
    bounds = [0, *starts, len(costs)]
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def largest_share(costs: Sequence[float], starts: Sequence[int]) -> float:
    """The largest stage's share of the total cost (its cost when the total is 0)."""
    loads = stage_loads(costs, starts)
    total = sum(loads)
    return max(loads) / total if total > 0 else max(loads)


def module_medians(rounds: Sequence[Sequence[float]]) -> list[float]:
    """Each module's median over the rounds."""
    return [median(column) for column in zip(*rounds)]


def candidate_cuts(rounds: Sequence[Sequence[float]], stages: int) -> list[tuple[int, ...]]:
    """The balanced cuts of the medians (first), of each round, and the medians' cuts with one
    cut moved by one module; without repeats, in that order."""
    k = len(rounds[0])
    base = tuple(balance(module_medians(rounds), stages))
    found = [base, *(tuple(balance(list(r), stages)) for r in rounds)]
    for i, cut in enumerate(base):
        for moved in (cut - 1, cut + 1):
            near = (*base[:i], moved, *base[i + 1:])
            if all(b > a for a, b in zip((0, *near), (*near, k))):  # every stage non-empty
                found.append(near)
    return list(dict.fromkeys(found))


def robust_cuts(rounds: Sequence[Sequence[float]], stages: int,
                tie: float = 1e-9) -> list[int]:
    """The modules where stages 1.. start, chosen from rounds of per-module costs: among
    `candidate_cuts`, the lowest median over rounds of `largest_share`; shares within ``tie``
    (relative) of the lowest count as equal, and then the medians' balanced cut, then the
    smallest cuts, win."""
    if not rounds:
        raise ValueError("need at least one round of module costs")
    k = len(rounds[0])
    if any(len(r) != k for r in rounds):
        raise ValueError("every round needs a cost for every module")
    if not 1 <= stages <= k:
        raise ValueError(f"cannot make {stages} stages of {k} modules")
    candidates = candidate_cuts(rounds, stages)
    score = {c: median(largest_share(r, c) for r in rounds) for c in candidates}
    best = min(score.values())
    close = [c for c in candidates if score[c] <= best * (1 + tie) + tie]
    # the medians' balanced cut is candidates[0]: first among the close ones if it is one
    return list(close[0] if close[0] == candidates[0] else min(close))


def measured_cuts(rule: UpdateRule, net: SplitNetwork, stages: int, batch: int = 32,
                  rounds: int = ROUNDS) -> list[int]:
    """The modules where stages 1.. start, from ``rounds`` interleaved timings of every module
    as a stage of its own (`round_costs`, `robust_cuts`)."""
    return robust_cuts(round_costs(module_steps(rule, net, batch), rounds), stages)
