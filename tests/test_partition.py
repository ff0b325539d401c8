"""The one min-max split behind module cuts by memory and stage cuts by time, against brute
force over every contiguous split."""

from __future__ import annotations

import itertools
import random

import pytest

from localearn.engine.stage_costs import balance
from localearn.errors import UserError
from localearn.models.cifar_resnet import balanced_cuts
from localearn.partition import min_max_cuts


def every_split(n: int, groups: int):
    return [list(c) for c in itertools.combinations(range(1, n), groups - 1)]


def largest(costs, cuts) -> float:
    bounds = [0, *cuts, len(costs)]
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


def test_the_smallest_largest_group_and_the_earliest_cuts_among_equals():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.randint(0, 4) for _ in range(n)]  # small integers: many exact ties
        for groups in range(1, n + 1):
            splits = every_split(n, groups)
            best = min(largest(costs, c) for c in splits)
            # among the best, the last cut as early as possible, then the one before it, ...
            want = min((c for c in splits if largest(costs, c) == best), key=lambda c: c[::-1])
            assert min_max_cuts(costs, groups) == want, (costs, groups)


@pytest.mark.parametrize("cut", [min_max_cuts, balance])
def test_float_costs_reach_the_optimum(cut):
    # stage cuts by time: float costs, `balance` as the pipeline calls it
    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(2, 9)
        costs = [rng.uniform(0.0, 5.0) for _ in range(n)]
        for groups in range(1, n + 1):
            starts = cut(costs, groups)
            assert len(starts) == groups - 1 and starts == sorted(set(starts))
            best = min(largest(costs, c) for c in every_split(n, groups))
            assert largest(costs, starts) == pytest.approx(best)


def test_both_users_share_it_and_name_their_own_errors():
    costs = [4, 4, 4, 2, 2, 1, 1]
    assert balance([float(c) for c in costs], 3) == balanced_cuts(costs, 3) \
        == min_max_cuts(costs, 3)
    with pytest.raises(ValueError, match="cannot make 8 stages of 7 modules"):
        balance([1.0] * 7, 8)
    with pytest.raises(UserError, match=r"K=0 is out of range: valid K is 1\.\.7"):
        balanced_cuts(costs, 0)
