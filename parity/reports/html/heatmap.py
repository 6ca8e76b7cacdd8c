"""Layer x step: each UNet block (and the sampler's pipeline tensors) per denoising step.

Free-running and isolated side by side tell whether a divergence is born in one block (that block's
row is hot in isolation too) or grows through sampling (the free map warms up step after step while
the isolated one stays cool).
"""
from __future__ import annotations

from typing import Any

from .values import as_float, rounded, sort_key

COMPONENTS = ("unet", "pipeline")
SAMPLER_ROW = "pipeline (sampler)"
CELL_FIELDS = ("ratio", "rel_l2", "status", "worst", "compared", "missing")


def step_heatmap(summary: dict[str, Any]) -> dict[str, Any] | None:
    """{rows: [group id], steps: [int], free: cells, isolated: cells | None}; None without steps.

    cells: one [row][step column] matrix per CELL_FIELDS: over the group's compared tensors the
    largest ratio to threshold and rel-L2, the status (fail if one fails or has another shape, else
    missing if one is missing, else pass), the row index of the largest ratio, and the counts of
    compared and missing tensors.
    """
    free = _stepped(summary["tensors"])
    if not free:
        return None
    row_ids = list(dict.fromkeys(_row_id(r) for r in free))
    steps = sorted({r["step"] for r in free})
    isolated = summary.get("isolated")
    return {"rows": row_ids, "steps": steps, "free": _cells(free, row_ids, steps),
            "isolated": _cells(_stepped(isolated["tensors"]), row_ids, steps) if isolated else None}


def _stepped(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["component"] in COMPONENTS and r["step"] is not None and r["status"] != "extra"]


def _row_id(row: dict[str, Any]) -> str:
    return SAMPLER_ROW if row["component"] == "pipeline" else row["group"]


def _cells(rows: list[dict], row_ids: list[str], steps: list[int]) -> dict[str, list]:
    position = {row_id: i for i, row_id in enumerate(row_ids)}
    column = {step: j for j, step in enumerate(steps)}
    cells = {name: [[None] * len(steps) for _ in row_ids] for name in CELL_FIELDS}
    worst_ratio: dict[tuple[int, int], float] = {}
    for row in rows:
        i, j = position.get(_row_id(row)), column.get(row["step"])
        if i is None or j is None:
            continue
        if cells["status"][i][j] is None:
            cells["status"][i][j], cells["compared"][i][j], cells["missing"][i][j] = "pass", 0, 0
        if row["status"] in ("fail", "shape_mismatch"):
            cells["status"][i][j] = "fail"
        elif row["status"] == "missing":
            cells["missing"][i][j] += 1
            if cells["status"][i][j] == "pass":
                cells["status"][i][j] = "missing"
        if row["ratio"] is None:
            continue
        cells["compared"][i][j] += 1
        if sort_key(row["ratio"]) > worst_ratio.get((i, j), -1.0):
            worst_ratio[(i, j)] = sort_key(row["ratio"])
            cells["ratio"][i][j], cells["worst"][i][j] = rounded(row["ratio"]), row["index"]
        error = as_float((row["metrics"] or {}).get("rel_l2"))
        if error is not None and sort_key(error) > sort_key(cells["rel_l2"][i][j]):
            cells["rel_l2"][i][j] = rounded(error)
    return cells
