"""The top of a case's report: verdict in plain words, the run's facts, where to look, how to reproduce."""
from __future__ import annotations

import json
import shlex
from typing import Any

from sd_parity.reports.summary import jsonable, metric_line, threshold_line

HEADLINES = {
    "parity": "Parity: the candidate matches the reference within tolerance",
    "divergence": "Divergence: the candidate does not match the reference",
    "incomplete": "Incomplete: reference tensors are missing from the candidate",
    "isolation_only": "Divergence in isolation only: fed the reference's inputs, a block or stage exceeds its threshold",
}
# (label, metadata field) shown from the run files' metadata
FACTS = (("model", "model"), ("prompt", "prompt"), ("negative prompt", "negative_prompt"), ("seed", "seed"),
         ("scheduler", "scheduler"), ("steps", "steps"), ("guidance", "guidance"), ("pipeline", "pipeline"),
         ("dtype", "dtype"), ("mode", "mode"), ("model hash", "model_hash"))
BACKENDS = ("numpy", "torch")
TEST_DTYPES = ("fp32", "fp64", "fp16", "bf16")  # tests/test_impl_models.py ids: <block>-<backend>-<dtype>


def overview(summary: dict[str, Any]) -> dict[str, Any]:
    runs = summary["runs"]
    case = summary.get("case") or {}
    ref, cand = runs["reference"]["metadata"], runs["candidate"]["metadata"]
    first = summary["first_divergence"]
    return {
        "title": case.get("name") or f"{runs['reference']['name']} vs {runs['candidate']['name']}",
        "status": summary["verdict"]["status"],
        "headline": HEADLINES.get(summary["verdict"]["status"], summary["verdict"]["status"]),
        "verdict": summary["verdict"]["text"],
        "facts": _facts(ref, cand, case, summary),
        "versions": _versions(ref, cand),
        "runs": [{"role": role, **run} for role, run in runs.items() if run is not None],
        "first": located(first) if first else None,
        "culprits": [{**c, "worst": located(c["worst"])} for c in summary["culprits"]],
        "isolated_given": summary["mode"]["isolated_given"],
        "outside": summary["isolated_failures_outside_blocks"],
        "coverage": summary["coverage"],
        "warnings": summary["warnings"] + (summary["isolated"]["warnings"] if summary.get("isolated") else []),
        "repro": _repro(summary, case, cand),
    }


def _facts(ref: dict, cand: dict, case: dict, summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs; a value the candidate records differently shows both."""
    facts = []
    for label, field in FACTS:
        if field not in ref and field not in cand:
            continue
        value = _text(ref.get(field))
        if field in cand and _text(cand[field]) != value:
            value += f" (candidate: {_text(cand[field])})"
        facts.append((label, value))
    if "height" in ref:
        facts.append(("size", f"{_text(ref.get('height'))}×{_text(ref.get('width'))}"))
    facts.append(("candidate", _text(case.get("candidate") or cand.get("impl"))))
    facts.append(("thresholds", "calibrated on an fp64 oracle" if summary["mode"]["calibrated"]
                  else "dtype tolerances (no oracle)"))
    facts.append(("tolerance config", _text(summary["config"]["source"])))
    return facts


def _versions(ref: dict, cand: dict) -> list[tuple[str, str, str]]:
    ref_v, cand_v = ref.get("versions") or {}, cand.get("versions") or {}
    if not isinstance(ref_v, dict) or not isinstance(cand_v, dict):
        return []
    return [(name, _text(ref_v.get(name, "-")), _text(cand_v.get(name, "-")))
            for name in sorted(set(ref_v) | set(cand_v))]


def located(row: dict[str, Any]) -> dict[str, Any]:
    """A row with the lines the page prints about it; in JSON form first, so a live summary and one
    read back from summary.json print the same (non-finite values as "Infinity", lists not tuples)."""
    row = jsonable(row)
    return {**row, "metric_line": metric_line(row), "threshold_line": threshold_line(row),
            "location": row.get("location") or row["key"]}


def _repro(summary: dict, case: dict, cand: dict) -> list[dict[str, str]]:
    """Copy-paste commands: the run (or comparison) itself, then one unit test per block to look at."""
    commands = []
    if case.get("repro"):
        commands.append({"what": "reproduce this case", "command": case["repro"]})
    else:
        runs = summary["runs"]
        parts = ["parity compare", shlex.quote(runs["reference"]["path"]), shlex.quote(runs["candidate"]["path"])]
        for option in ("oracle", "isolated"):
            if runs[option]:
                parts.append(f"--{option} {shlex.quote(runs[option]['path'])}")
        commands.append({"what": "compare the run files again", "command": " ".join(parts + ["--output-dir DIR"])})
    blocks = []
    if summary["first_divergence"] and summary["first_divergence"]["block"]:
        blocks.append(summary["first_divergence"]["block"])
    blocks += [c["block"] for c in summary["culprits"]]
    narrow = [value for value in (case.get("candidate") or cand.get("impl"), cand.get("dtype"))
              if value in BACKENDS or value in TEST_DTYPES]
    for block in dict.fromkeys(blocks):
        commands.append({"what": f"unit test of block {block}",
                         "command": "pytest -k " + shlex.quote(" and ".join([block, *narrow]))})
    return commands


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)
