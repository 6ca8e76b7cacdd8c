"""Numbers as the report reads and embeds them.

A summary comes either straight from `build_summary` (floats, possibly inf/nan) or from summary.json
(where non-finite floats are the strings "Infinity", "-Infinity", "NaN"); both read the same here.
"""
from __future__ import annotations

import math

# What a person reads off a chart or a table; it also keeps a 35,000-row report small.
SIGNIFICANT_DIGITS = 5


def as_float(value) -> float | None:
    """A summary number (or its non-finite string form) as a float; None stays None."""
    if type(value) is float:  # the common case, first: reports of 70,000 rows call this a million times
        return value
    if value is None or isinstance(value, bool):
        return None
    return float(value)


def rounded(value) -> float | str | None:
    """`value` rounded for embedding, non-finite values in summary.json's string form."""
    if type(value) is float and math.isfinite(value):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    number = as_float(value)
    if number is None:
        return None
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return float(f"{number:.{SIGNIFICANT_DIGITS}g}")


def sort_key(value) -> float:
    """Larger is worse; None sorts first (not compared), NaN with infinity (worst)."""
    number = as_float(value)
    if number is None:
        return -1.0
    return math.inf if math.isnan(number) else number
