"""The automatic stage cut under timing noise: `stage_costs.robust_cuts` on synthetic rounds of
module costs (no timing here), and the interleaved measurement on stand-in steps."""

import itertools
import random

import pytest
from torch import nn

from localearn.engine.stage_costs import (
    candidate_cuts,
    largest_share,
    measured_cuts,
    robust_cuts,
    round_costs,
    stage_loads,
)
from localearn.engine.stages import balance

#: ResNet-32 K=16 under dgl on one CPU thread, per-module shares of a step (%): the balanced
#: 2-stage cut starts stage 1 at module 6
TRUE = [4.0, 10.0, 9.5, 9.5, 9.0, 8.5, 5.8, 4.8, 5.3, 6.0, 5.3, 4.6, 4.4, 4.5, 4.5, 4.0]


def noisy_rounds(costs, rounds, spread, seed):
    """``rounds`` copies of ``costs``, each module scaled by 1 +- ``spread`` (uniform)."""
    rng = random.Random(seed)
    return [[c * (1 + rng.uniform(-spread, spread)) for c in costs] for _ in range(rounds)]


def test_one_noisy_round_does_not_move_the_cut():
    assert balance(TRUE, 2) == [6]
    # module 3 timed during a hiccup (twice its time): that round alone cuts at 5
    hiccup = [c * (2.0 if i == 3 else 1.0) for i, c in enumerate(TRUE)]
    assert balance(hiccup, 2) == [5]
    assert robust_cuts([TRUE, TRUE, hiccup, TRUE, TRUE], 2) == [6]
    # modules 0 to 4 timed 40% slower (another process starting): that round cuts at 5
    spell = [c * (1.4 if i <= 4 else 1.0) for i, c in enumerate(TRUE)]
    assert balance(spell, 2) == [5]
    for where in range(5):
        rounds = noisy_rounds(TRUE, 5, 0.03, seed=where)
        rounds[where] = spell
        assert robust_cuts(rounds, 2) == [6]
    # the old planner's way: each module's median over its own repeats, the repeats of modules
    # 0 to 4 all inside the spell, moves the cut; interleaved rounds spread the spell
    assert balance([spell[i] if i <= 4 else TRUE[i] for i in range(16)], 2) == [5]


def test_small_noise_on_every_round_keeps_the_true_cut():
    # the best cuts of TRUE beat the next best by 11% (2 stages) and 15% (3 stages)
    for stages in (2, 3):
        truth = balance(TRUE, stages)
        for seed in range(30):
            assert robust_cuts(noisy_rounds(TRUE, 5, 0.1, seed), stages) == truth


def test_noise_free_rounds_give_balance():
    rng = random.Random(1)
    for _ in range(40):
        k = rng.randint(1, 10)
        costs = [rng.uniform(0.1, 5.0) for _ in range(k)]
        for stages in range(1, k + 1):
            for rounds in (1, 2, 5):
                assert robust_cuts([costs] * rounds, stages) == balance(costs, stages)


def test_ties_are_broken_the_same_way_every_time():
    # equal modules: 2 stages of 5 are best; 4 and 6 are the same in another round
    flat = [1.0] * 10
    assert robust_cuts([flat] * 3, 2) == balance(flat, 2) == [5]
    # cuts 2 and 3 exactly equal on every round (the heavy module in the middle): the
    # medians' balanced cut, the smaller one, whatever the round order
    a, b = [1.0, 1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 3.0, 1.0, 1.0]
    assert balance(a, 2) == balance(b, 2) == [2]
    assert robust_cuts([a, b], 2) == robust_cuts([b, a], 2) == [2]
    # round order never matters
    rounds = noisy_rounds(TRUE, 5, 0.2, seed=7)
    picks = {tuple(robust_cuts(list(p), 3)) for p in itertools.permutations(rounds)}
    assert len(picks) == 1


def test_the_chosen_cut_is_the_best_median_share_of_its_candidates():
    for seed in range(10):
        rounds = noisy_rounds(TRUE, 5, 0.3, seed)
        got = tuple(robust_cuts(rounds, 3))
        candidates = candidate_cuts(rounds, 3)
        assert got in candidates
        shares = {c: sorted(largest_share(r, c) for r in rounds)[2] for c in candidates}
        assert shares[got] == pytest.approx(min(shares.values()))


def test_stage_and_module_edge_cases():
    assert robust_cuts([[3.0]], 1) == []
    assert robust_cuts([[1.0, 2.0, 3.0]] * 2, 1) == []
    assert robust_cuts([[1.0, 2.0, 3.0]] * 2, 3) == [1, 2]  # one module a stage
    assert robust_cuts([[5.0, 0.1]], 2) == [1]
    assert robust_cuts([[0.0, 0.0, 0.0]], 2) == balance([0.0] * 3, 2)  # all free
    with pytest.raises(ValueError, match="cannot make 4 stages of 3"):
        robust_cuts([[1.0, 2.0, 3.0]], 4)
    with pytest.raises(ValueError, match="cannot make 0 stages"):
        robust_cuts([[1.0, 2.0, 3.0]], 0)
    with pytest.raises(ValueError, match="at least one round"):
        robust_cuts([], 2)
    with pytest.raises(ValueError, match="every module"):
        robust_cuts([[1.0, 2.0], [1.0]], 2)
    assert stage_loads([1.0, 2.0, 3.0, 4.0], [1, 3]) == [1.0, 5.0, 4.0]
    assert largest_share([1.0, 2.0, 3.0, 4.0], [1, 3]) == 0.5
    # neighbours of the cut stay inside 1..K-1 with every stage non-empty
    for cut in candidate_cuts([[1.0, 9.0, 1.0]], 3):
        assert list(cut) == [1, 2]


def test_rounds_time_every_step_once_a_round_in_order():
    calls = []
    steps = [lambda i=i: calls.append(i) for i in range(3)]
    table = round_costs(steps, rounds=4)
    assert len(table) == 4 and all(len(r) == 3 and min(r) >= 0 for r in table)
    assert calls == [0, 1, 2] * 5  # the untimed round, then 4 interleaved rounds
    with pytest.raises(ValueError, match="at least 1 round"):
        round_costs(steps, rounds=0)


class _Net(nn.Module):
    """A stand-in split network: 3 linear modules on 4 features."""

    input_shape, k = (4,), 3

    def __init__(self):
        super().__init__()
        self.local_modules = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


class _Rule:
    """A stand-in rule whose step notes which modules it ran and the input of each."""

    seen: list = []

    def train_step(self, ctx, net, images, targets):
        for i in ctx.modules(net.k):
            x = ctx.enter(i, images)
            _Rule.seen.append((i, x.equal(images)))  # only module 0 gets the images
            net.local_modules[i](x).sum().backward()


def test_measured_cuts_runs_each_module_alone_on_copies():
    net, _Rule.seen = _Net(), []
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cuts = measured_cuts(_Rule(), net, 2, batch=2, rounds=2)
    assert cuts in ([1], [2])
    # one module a call, on its input from the modules before it: untimed round, then 2
    assert _Rule.seen == [(0, True), (1, False), (2, False)] * 3
    assert all(v.equal(before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())  # gradients went to the copies
