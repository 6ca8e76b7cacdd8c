"""Tensor rows as the page's table and charts read them: parallel arrays, repeated strings interned.

Row objects with their thresholds' settings are ~7 kB each; these columns are ~150 bytes a row, so a
35,000-row capture still fits the page, and the table, the charts' points and their tooltips all
read the same arrays (row i of `tensors` is position i of every column).
"""
from __future__ import annotations

import math
from typing import Any

from .values import as_float, rounded

# columns whose values repeat: stored as an index into a per-column list of distinct strings
INTERNED = ("component", "invocation", "group", "status", "dtype")
NUMERIC = ("ratio", "rel_l2", "sqnr_db", "max_abs", "max_rel", "cosine_distance", "ulp_max", "tol_rel_l2")


def table_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{"count", "values": {interned column: [distinct strings]}, "columns": {column: [per row]},
    "cand_keys": {row: candidate key where the name map changed it}}."""
    values: dict[str, dict[str, int]] = {name: {} for name in INTERNED}
    columns: dict[str, list] = {name: [] for name in (*INTERNED, "order", "name", "shape", "reason", *NUMERIC)}
    cand_keys = {}
    for row in rows:
        metrics = row["metrics"] or {}
        fields = {"component": row["component"], "invocation": row["invocation"], "group": row["group"],
                  "status": row["status"], "dtype": _dtype(row)}
        for name, text in fields.items():
            columns[name].append(values[name].setdefault(text, len(values[name])))
        columns["order"].append(row["order"] if row["order"] is not None else row["cand_order"])
        columns["name"].append(row["name"])
        shape = row["ref_shape"] if row["ref_shape"] is not None else row["cand_shape"]
        columns["shape"].append("×".join(map(str, shape)) if shape is not None else "")
        columns["reason"].append(_reason(row))
        columns["ratio"].append(rounded(row["ratio"]))
        for name in ("rel_l2", "sqnr_db", "max_abs", "max_rel", "cosine_distance", "ulp_max"):
            columns[name].append(rounded(metrics.get(name)))
        columns["tol_rel_l2"].append(rounded(tolerance_rel_l2(row)))
        if row.get("cand_key") and row["cand_key"] != row["key"]:
            cand_keys[row["index"]] = row["cand_key"]
    return {"count": len(rows), "values": {name: list(seen) for name, seen in values.items()},
            "columns": columns, "cand_keys": cand_keys}


def tolerance_rel_l2(row: dict[str, Any]) -> float | None:
    """The tensor's threshold as a relative L2 error (‖c − r‖ / ‖r‖), to draw it on the rel-L2 chart.

    Pass/fail is decided by the threshold's criteria (see `ratio`); this is the rel-L2 an error that
    just meets the tolerance would have:
    * normwise: ‖c − r‖ ≤ rtol·‖r‖ + atol·√n, so rtol + atol·√n / ‖r‖;
    * calibrated: ‖c − o‖ may reach `limit`·‖o‖ and the reference itself is `ref_error`·‖o‖ from the
      oracle, so ‖c − r‖ / ‖r‖ may reach limit + ref_error (triangle inequality, ‖o‖ ≈ ‖r‖); for the
      RMS statistic (all-zero oracle) the same sum is an RMS, scaled by √n / ‖r‖.
    None for integer tensors and when ‖r‖ is 0.
    """
    threshold, metrics = row.get("threshold"), row.get("metrics")
    if not threshold or not metrics or metrics.get("kind") != "float":
        return None
    ref_l2 = as_float(metrics.get("ref_l2"))
    settings = threshold["settings"]
    root_n = math.sqrt(metrics["finite"] or metrics["numel"] or 1)
    if threshold["mode"] == "calibrated":
        bound = as_float(settings["limit"]) + as_float(settings["ref_error"])
        if settings["statistic"] == "rel_l2":
            return bound
        return bound * root_n / ref_l2 if ref_l2 else None
    if threshold["mode"] == "normwise":
        return settings["rtol"] + settings["atol"] * root_n / ref_l2 if ref_l2 else None
    return None


def _dtype(row: dict[str, Any]) -> str:
    ref, cand = row["ref_dtype"], row["cand_dtype"]
    if ref and cand and ref != cand:
        return f"{cand}/{ref}"
    return cand or ref or ""


def _reason(row: dict[str, Any]) -> str:
    """Why a row is not a plain pass (empty for passes, to keep the page small), with its diagnosis."""
    diagnosis = "".join(f"; diagnosis: {d['text']} (fix: {d['fix']})" for d in row.get("diagnoses", []))
    if row["status"] == "fail" and row["threshold"]:
        return row["threshold"]["reason"] + diagnosis
    if row["status"] == "shape_mismatch":
        return f"shape {row['cand_shape']} vs reference {row['ref_shape']}{diagnosis}"
    if row["status"] in ("missing", "extra", "skipped"):
        return "; ".join(row["notes"]) or row["status"]
    return ""
