"""Is a tensor's error its own or inherited? Its block's inputs and its isolated-mode twin say.

In the free run every tensor carries the error of everything upstream. Two things separate that from
the tensor's own error: the block's captured inputs (already divergent: inherited) and the same
tensor in the isolated run, computed from the reference's own inputs (still failing there: local).
"""
from __future__ import annotations

from typing import Any

from .values import rounded

BAD = ("fail", "shape_mismatch", "missing")
UPSTREAM = 3  # preceding tensors shown for context


class Provenance:
    """Indexes both comparisons of a summary once; `of(source, index)` describes one row."""

    def __init__(self, summary: dict[str, Any]):
        isolated = summary.get("isolated")
        self._rows = {"free": summary["tensors"], "isolated": isolated["tensors"] if isolated else []}
        self._by_key = {source: {r["key"]: r for r in rows} for source, rows in self._rows.items()}

    def of(self, source: str, index: int) -> dict[str, Any]:
        """{inputs, block_output, upstream, twin: brief rows; verdict: local | inherited | None; why}."""
        rows = self._rows[source]
        row = rows[index]
        same_call = [r for r in rows if r["component"] == row["component"] and r["invocation"] == row["invocation"]]
        inputs = [r for r in same_call if row["block"] and r["block"] == row["block"] and r["kind"] == "input"]
        output = next((r for r in same_call if row["block_path"] and r["name"] == row["block_path"]
                       and r is not row), None)
        upstream = [r for r in same_call if r["order"] is not None and row["order"] is not None
                    and r["order"] < row["order"] and r["index"] not in {i["index"] for i in inputs}][-UPSTREAM:]
        other = "isolated" if source == "free" else "free"
        twin = self._by_key[other].get(row["key"])
        verdict, why = _judge(source, row, twin, inputs)
        return {"inputs": [_brief(r, source) for r in inputs],
                "block_output": _brief(output, source) if output else None,
                "upstream": [_brief(r, source) for r in upstream],
                "twin": _brief(twin, other) if twin else None, "verdict": verdict, "why": why}


def _judge(source: str, row: dict, twin: dict | None, inputs: list[dict]) -> tuple[str | None, str]:
    if row["status"] not in BAD:
        return None, "within tolerance"
    if source == "isolated":
        return "local", "isolated mode feeds the block the reference's inputs, so this error is the block's own"
    if twin is not None and twin["status"] in ("pass", "fail"):
        if twin["status"] == "fail":
            return "local", "it fails in isolation too, computed from the reference's own inputs"
        return "inherited", "it is within tolerance in isolation (reference inputs): its error comes from upstream"
    if inputs:
        if any(r["status"] in BAD for r in inputs):
            return "inherited", "the block's inputs already diverge"
        return "local", "the block's inputs are within tolerance, this tensor is not"
    return None, "no isolated run and no captured block inputs to tell"


def _brief(row: dict[str, Any], source: str) -> dict[str, Any]:
    metrics = row["metrics"] or {}
    return {"source": source, "index": row["index"], "key": row["key"], "name": row["name"], "kind": row["kind"],
            "status": row["status"], "ratio": rounded(row["ratio"]), "rel_l2": rounded(metrics.get("rel_l2"))}
