"""Error along depth: per component, which tensors each chart draws, in execution order.

The charts read y values (rel-L2, SQNR, ratio, tolerance) from the table columns by row index, so a
series is only row indices: the free-running comparison's and, when given, the isolated one's
(same keys, same reference order), each decimated to keep extremes (decimate.keep_extremes).
"""
from __future__ import annotations

import math
from typing import Any

from .decimate import keep_extremes
from .values import as_float

# Tensors drawn per chart at most (free and isolated together): Chart.js stays fluid and a full
# sd15-arch capture (~35,000 rows) stays within the report's size budget.
POINTS_PER_CHART = 5000


def depth_series(rows: list[dict[str, Any]], isolated_rows: list[dict[str, Any]] | None,
                 first_index: int | None) -> list[dict[str, Any]]:
    """[{component, free: [row index], isolated: [row index], invocations: [[first order, label]],
    total_free, total_isolated}] in the components' first-seen order; only float tensors compared."""
    charts = []
    for component in dict.fromkeys(r["component"] for r in rows):
        free = _plotted(rows, component)
        isolated = _plotted(isolated_rows or [], component)
        if not free and not isolated:
            continue
        cap = POINTS_PER_CHART // 2 if free and isolated else POINTS_PER_CHART
        always = [p for p, row in enumerate(free) if row["index"] == first_index]
        charts.append({
            "component": component,
            "free": _decimated(free, cap, always),
            "isolated": _decimated(isolated, cap, ()),
            "total_free": len(free),
            "total_isolated": len(isolated),
            "invocations": _invocation_starts(free or isolated),
        })
    return charts


def _plotted(rows: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    plotted = [r for r in rows if r["component"] == component and r["order"] is not None
               and r["metrics"] is not None and r["metrics"].get("kind") == "float"]
    return sorted(plotted, key=lambda r: r["order"])


def _decimated(rows: list[dict[str, Any]], cap: int, always) -> list[int]:
    log_error = [_log(r["metrics"].get("rel_l2")) for r in rows]
    ratio = [_log(r["ratio"]) for r in rows]
    return [rows[p]["index"] for p in keep_extremes([log_error, ratio], cap, always)]


def _invocation_starts(rows: list[dict[str, Any]]) -> list[list]:
    starts: dict[str, int] = {}
    for row in rows:
        starts.setdefault(row["invocation"], row["order"])
    return [[order, label] for label, order in starts.items()]


def _log(value) -> float | None:
    number = as_float(value)
    if number is None or math.isnan(number):
        return None
    return math.log10(number) if number > 0 else -math.inf
