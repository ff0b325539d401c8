"""Contiguous splits of a list of costs into groups whose costliest group is as cheap as
possible: the cut of a network into modules by memory, and into pipeline stages by time."""

from __future__ import annotations

from collections.abc import Sequence


def min_max_cuts(costs: Sequence[float], groups: int) -> list[int]:
    """The indices where groups 1.. start, for ``groups`` contiguous non-empty groups of
    ``costs`` with the smallest largest-group cost. Among equal splits the cuts come earliest:
    later groups take as many of the last items as the bound allows."""
    n = len(costs)
    if not 1 <= groups <= n:
        raise ValueError(f"cannot make {groups} groups of {n} items")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # the smallest bound is the cost of some contiguous run; the total always fits
    bounds = sorted({prefix[b] - prefix[a] for a in range(n) for b in range(a + 1, n + 1)})
    lo, hi = 0, len(bounds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _pack_from_back(prefix, groups, bounds[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    found = _pack_from_back(prefix, groups, bounds[lo])
    assert found is not None
    return found


def _pack_from_back(prefix: list[float], groups: int, limit: float) -> list[int] | None:
    """Fill groups G-1, G-2, ... with as many items as fit under ``limit``, leaving at least
    one item per earlier group; the group starts, or None when ``limit`` is too low."""
    starts: list[int] = []
    end = len(prefix) - 1
    for g in range(groups - 1, 0, -1):
        start = end
        while start - 1 >= g and prefix[end] - prefix[start - 1] <= limit:
            start -= 1
        if start == end:
            return None
        starts.append(start)
        end = start
    return starts[::-1] if prefix[end] <= limit else None
