"""Fewer points for a chart without losing what a person looks for: the extremes.

The points are split into equal runs (buckets) in their x order; each bucket keeps the points that
hold its smallest and largest value of every series, so a spike or a dip is never averaged away.
"""
from __future__ import annotations

import math
from typing import Sequence


def keep_extremes(series: Sequence[Sequence[float | None]], cap: int, always: Sequence[int] = ()) -> list[int]:
    """Positions (sorted) of at most `cap` points that keep each bucket's min and max of every series.

    `series` are parallel value lists over the same points (None: no value); `always` are positions
    that must stay (e.g. the first divergence), counted against the cap.
    """
    count = len(series[0]) if series else 0
    if count <= cap:
        return list(range(count))
    always = sorted(set(always))[:cap]
    per_bucket = 2 * len(series)
    buckets = max(1, (cap - len(always)) // per_bucket)
    kept = set(always)
    for bucket in range(buckets):
        start, stop = bucket * count // buckets, (bucket + 1) * count // buckets
        for values in series:
            valued = [i for i in range(start, stop) if _finite_or_inf(values[i])]
            if valued:
                kept.add(min(valued, key=lambda i: values[i]))
                kept.add(max(valued, key=lambda i: values[i]))
    return sorted(kept)  # at most len(always) + buckets * per_bucket <= cap


def _finite_or_inf(value) -> bool:
    return value is not None and not math.isnan(value)
