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

from dataclasses import dataclass

from localearn import distributed as dist_
from localearn.engine.stage_costs import balance, measured_cuts, module_costs, timed
from localearn.errors import SameOnEveryRank, UserError
from localearn.interfaces import SplitNetwork, UpdateRule

__all__ = ["Layout", "StageLost", "balance", "check_microbatches", "check_pipelinable",
           "layout_of", "module_costs", "parse_stage_cuts", "plan_cuts", "stage_ranges", "timed"]


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
                              f"{rule.expression} trains K={k} (give --k {stages} or more)")
    return rule


def check_microbatches(rule: UpdateRule, microbatches: int, batch_size: int, stages: int = 1,
                       drop_last: bool = True) -> None:
    """One line (`SameOnEveryRank`) unless ``rule`` trains with ``microbatches`` equal
    microbatches of every batch of ``batch_size`` on ``stages`` stages."""
    why = rule.microbatch_check(microbatches, stages)
    if why:
        raise SameOnEveryRank(f"invalid --microbatches {microbatches}: {why}")
    if microbatches > 1 and batch_size % microbatches:
        raise SameOnEveryRank(f"invalid --microbatches {microbatches}: it must divide "
                              f"--batch-size {batch_size} (every microbatch the same size)")
    if microbatches > 1 and not drop_last:
        raise SameOnEveryRank(f"invalid --microbatches {microbatches}: an epoch's last partial "
                              "batch may not divide into equal microbatches; drop --no-drop-last")


def plan_cuts(cfg, rule: UpdateRule, net: SplitNetwork, env: dist_.DistEnv) -> list[int]:
    """The modules where stages 1.. start: ``cfg.stage_cuts``, or balanced by time measured on
    rank 0 (times differ between processes; `stage_costs.measured_cuts`) and broadcast, so
    every process cuts alike."""
    if cfg.stage_cuts:
        return parse_stage_cuts(cfg.stage_cuts, net.k, cfg.stages)
    starts = None
    if env.is_main:

        starts = measured_cuts(rule, net, cfg.stages, min(cfg.batch_size, 128))
    try:
        return dist_.broadcast_object(starts, env)
    except RuntimeError:
        raise StageLost(f"rank {env.rank} lost its peers while the stage cuts were measured: "
                        "another process of this pipelined job stopped; every stage "
                        "stops") from None
