"""Baselines: what got worse since a previous comparison (its summary.json).

A port under development lives with known divergences; run over run, the question is what changed.
Against a baseline summary, a tensor is reported when
  - it diverges now (fail or shape mismatch) and did not in the baseline ("newly divergent");
  - its ratio (error / tolerance) grew by more than `margin` times and is now at least MIN_RATIO of its
    tolerance ("worse"; a tensor far inside its tolerance is not tracked for noise);
  - it was compared in the baseline and is not now ("vanished": missing, skipped or not captured);
and new tensors (compared now, not in the baseline) are listed. Both the free and the isolated rows are
tracked. A comparison with a baseline fails (exit 1) on a newly divergent, worse or vanished tensor, and
passes otherwise, whatever its own verdict: the divergences it shares with the baseline are known.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from sd_parity.errors import BadInput

from .compare import DIVERGENT

DEFAULT_MARGIN = 1.5
MIN_RATIO = 0.1
COMPARED = ("pass", "fail", "accepted")
LISTED = 20  # rows of each kind kept in summary.json


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """A baseline summary: a summary.json, or a folder holding one."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise BadInput(f"--baseline {path}: no summary.json there; give a summary.json written by parity compare "
                       "or parity run (or the folder holding it)")
    from sd_parity.reports.summary import load_summary  # summary.json with its details file beside it

    baseline = load_summary(file)
    if not isinstance(baseline.get("tensors"), list):
        raise BadInput(f"--baseline {file}: not a summary.json of sd-parity (no tensors list)")
    baseline["path"] = str(file)
    return baseline


def check_margin(margin: float) -> float:
    if not 1 <= margin < math.inf:
        raise BadInput(f"--baseline-margin {margin}: a margin is a factor >= 1 (e.g. 1.5: 50% growth)")
    return margin


def compare_to_baseline(summary: dict[str, Any], baseline: dict[str, Any], margin: float = DEFAULT_MARGIN,
                        keys: set[str] | None = None) -> dict[str, Any]:
    """The baseline section of a summary: what got worse, what is new, what vanished; and the exit code.
    `keys`: track only these tensors (assert_parity's `only`)."""
    check_margin(margin)
    found = {"newly_divergent": [], "worse": [], "vanished": [], "new": [], "improved": 0}
    for run in ("free", "isolated"):
        now, before = _rows(summary, run, keys), _rows(baseline, run, keys)
        for key, row in now.items():
            old = before.get(key)
            if old is None or old["status"] not in COMPARED:
                if row["status"] in COMPARED or row["status"] in DIVERGENT:
                    found["new"].append(_entry(run, row, old))
                continue
            if row["status"] in DIVERGENT and old["status"] not in DIVERGENT:
                found["newly_divergent"].append(_entry(run, row, old))
            elif row["status"] not in COMPARED and row["status"] not in DIVERGENT:
                found["vanished"].append(_entry(run, row, old))
            elif _ratio(row) > max(margin * _ratio(old), MIN_RATIO):
                found["worse"].append(_entry(run, row, old))
            elif _ratio(old) > max(margin * _ratio(row), MIN_RATIO):
                found["improved"] += 1
        found["vanished"] += [_entry(run, {"key": key, "status": "absent", "ratio": None}, old)
                              for key, old in before.items() if key not in now and old["status"] in COMPARED]
    bad = len(found["newly_divergent"]) + len(found["worse"]) + len(found["vanished"])
    new_divergent = [e for e in found["new"] if e["status"] in DIVERGENT]
    bad += len(new_divergent)
    text = (f"regression since the baseline: " + ", ".join(_counts(found, new_divergent)) if bad else
            f"no regression since the baseline ({_tail(found)})")
    return {"path": baseline.get("path"), "created": baseline.get("created"), "margin": margin,
            "min_ratio": MIN_RATIO, "regressed": bool(bad), "exit_code": 1 if bad else 0, "text": text,
            "counts": {k: (len(v) if isinstance(v, list) else v) for k, v in found.items()},
            **{k: v[:LISTED] for k, v in found.items() if isinstance(v, list)}}


def _rows(summary: dict[str, Any], run: str, keys: set[str] | None) -> dict[str, dict]:
    rows = summary.get("tensors") if run == "free" else (summary.get("isolated") or {}).get("tensors")
    return {row["key"]: row for row in rows or [] if row.get("status") != "extra" and (keys is None or row["key"] in keys)}


def _ratio(row: dict) -> float:
    value = row.get("ratio")
    if value is None:
        return 0.0
    return float(value) if not isinstance(value, str) else math.inf  # "Infinity" or "NaN" in summary.json


def _entry(run: str, row: dict, old: dict | None) -> dict[str, Any]:
    return {"run": run, "key": row["key"], "status": row["status"], "ratio": row.get("ratio"),
            "baseline_status": old["status"] if old is not None else None,
            "baseline_ratio": old.get("ratio") if old is not None else None}


def _counts(found: dict, new_divergent: list) -> list[str]:
    parts = []
    for kind, words in (("newly_divergent", "newly divergent"), ("worse", "worse by more than the margin"),
                        ("vanished", "vanished")):
        if found[kind]:
            first = found[kind][0]
            change = f", ratio {_fmt(first['ratio'])}, was {_fmt(first['baseline_ratio'])}" if kind == "worse" else ""
            parts.append(f"{len(found[kind])} tensor(s) {words} (first: {first['key']}{change})")
    if new_divergent:
        parts.append(f"{len(new_divergent)} new tensor(s) divergent (first: {new_divergent[0]['key']})")
    return parts


def _fmt(ratio) -> str:
    return "-" if ratio is None else f"{_ratio({'ratio': ratio}):.3g}"


def _tail(found: dict) -> str:
    parts = [f"{found['improved']} improved"]
    if found["new"]:
        parts.append(f"{len(found['new'])} new tensor(s), none divergent")
    return ", ".join(parts)
