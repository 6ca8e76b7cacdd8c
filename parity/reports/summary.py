"""What `parity compare` writes: summary.json, junit.xml and the terminal table.

docs/summary-format.md is the normative description of summary.json (SCHEMA_VERSION below).
`render_outputs(summary, out_dir)` is the single place that writes files for a comparison: the HTML
report hooks in there, and the three files are replaced as one set (sd_parity.outputs.write_set).
Names are data: the terminal table and junit.xml show non-printable characters escaped
(sd_parity.escaping); summary.json keeps them as they are.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sd_parity.escaping import printable, xml_safe
from sd_parity.impl.families import COMPONENTS
from sd_parity.judging.compare import Comparison, TensorResult
from sd_parity.judging.diagnosis import clause as diagnosis_clause
from sd_parity.judging.overflow import overflow_clause, reference_overflow
from sd_parity.judging.scope import scope_clause
from sd_parity.outputs import output_error, write_atomic, write_set
from sd_parity.judging.verdict import Culprit, Verdict, describe_location, verdict_dict

SCHEMA_VERSION = 1
SUMMARY_FILE = "summary.json"
JUNIT_FILE = "junit.xml"
_GROUP_BAD = ("fail", "shape_mismatch", "missing")


# ---------------------------------------------------------------------------------------------------
# summary dict


def build_summary(comparison: Comparison, verdict: Verdict, isolated: Comparison | None = None,
                  *, config_source: str | None = None) -> dict[str, Any]:
    """The complete, JSON-ready description of a comparison (see docs/summary-format.md)."""
    runs = {
        "reference": _run_info(comparison.ref_path, comparison.ref_metadata, comparison.coverage.ref_tensors),
        "candidate": _run_info(comparison.cand_path, comparison.cand_metadata, comparison.coverage.cand_tensors),
        "oracle": (_run_info(comparison.oracle_path, comparison.oracle_metadata, None)
                   if comparison.oracle_path is not None else None),
        "isolated": (_run_info(isolated.cand_path, isolated.cand_metadata, isolated.coverage.cand_tensors)
                     if isolated is not None else None),
    }
    first = verdict.first_divergence
    summary = {
        "schema_version": SCHEMA_VERSION,
        "tool": "parity compare",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": _verdict(comparison, verdict),
        "diagnosis": comparison.diagnosis,
        "first_divergence": _first_divergence(first) if first is not None else None,
        "culprits": [_culprit(c) for c in verdict.culprits],
        "deviations": verdict.deviations.to_dict() if verdict.deviations is not None else None,
        "isolated_failures_outside_blocks": [_brief(r) for r in verdict.isolated_failures_outside_blocks],
        "runs": runs,
        "mode": {"candidate": comparison.mode, "calibrated": comparison.calibrated,
                 "isolated_given": isolated is not None},
        "config": {
            "source": config_source if config_source is not None else comparison.tolerances.source,
            "tolerances": comparison.tolerances.describe(),
            "name_map": comparison.name_map.describe() if comparison.name_map is not None else None,
        },
        "coverage": _coverage(comparison),
        "warnings": list(comparison.warnings),
        "timing": {"seconds": comparison.seconds, "bytes_read": comparison.bytes_read},
        "blocks": block_groups(comparison.results),
        "tensors": [row_dict(r) for r in comparison.results],
        "isolated": None,
    }
    if isolated is not None:
        summary["isolated"] = {
            "mode": isolated.mode,
            "coverage": _coverage(isolated),
            "warnings": list(isolated.warnings),
            "timing": {"seconds": isolated.seconds, "bytes_read": isolated.bytes_read},
            "blocks": block_groups(isolated.results),
            "tensors": [row_dict(r) for r in isolated.results],
        }
    return summary


def _verdict(comparison: Comparison, verdict: Verdict) -> dict[str, Any]:
    """The verdict, stating what was left out of the judgement and what the diagnosis found."""
    info = verdict_dict(verdict)
    coverage = comparison.coverage
    info["reference_overflow"] = reference_overflow(comparison.results)
    info["text"] += (scope_clause(coverage.scope.to_dict(), coverage.ref_tensors) + diagnosis_clause(comparison.diagnosis)
                     + overflow_clause(info["reference_overflow"]))
    return info


def _run_info(path, metadata, tensors) -> dict[str, Any]:
    path = Path(path)
    return {"path": str(path), "name": path.name, "metadata": metadata, "tensors": tensors,
            "bytes": path.stat().st_size if path.exists() else None}


def row_dict(result: TensorResult) -> dict[str, Any]:
    block = result.block
    decision = result.decision
    return {
        "index": result.index,
        "order": result.order,
        "cand_order": result.cand_order,
        "key": result.key,
        "cand_key": result.cand_key,
        "component": result.component,
        "invocation": result.invocation,
        "step": result.step,
        "name": result.name,
        "module": result.module,
        "kind": result.kind,
        "block": block.test_id if block is not None else None,
        "block_path": block.path if block is not None else None,
        "group": group_id(result),
        "status": result.status,
        "ref_dtype": result.ref_dtype,
        "cand_dtype": result.cand_dtype,
        "ref_shape": result.ref_shape,
        "cand_shape": result.cand_shape,
        "ratio": decision.ratio if decision is not None else None,
        "metrics": result.metrics.to_dict() if result.metrics is not None else None,
        "threshold": decision.to_dict() if decision is not None else None,
        "notes": list(result.notes),
        "diagnoses": [d.to_dict() for d in result.diagnoses],
    }


def _brief(result: TensorResult) -> dict[str, Any]:
    return {"key": result.key, "index": result.index, "status": result.status, "ratio": result.ratio,
            "block": result.block_id, "reason": result.decision.reason if result.decision else result.status}


def _first_divergence(result: TensorResult) -> dict[str, Any]:
    row = row_dict(result)
    row["location"] = describe_location(result)
    return row


def _culprit(culprit: Culprit) -> dict[str, Any]:
    return {"block": culprit.block, "component": culprit.component, "path": culprit.path,
            "invocations": culprit.invocations, "failing_tensors": culprit.failing_tensors,
            "worst": row_dict(culprit.worst)}


def _coverage(comparison: Comparison) -> dict[str, Any]:
    c = comparison.coverage
    return {
        "ref_tensors": c.ref_tensors, "cand_tensors": c.cand_tensors, "compared": c.compared,
        "counts": dict(c.counts), "missing": c.missing, "extra": c.extra, "shape_mismatch": c.shape_mismatch,
        "skipped": c.skipped, "dtype_differences": c.dtype_differences,
        "missing_invocations": c.missing_invocations, "extra_invocations": c.extra_invocations,
        "unmatched_names": c.unmatched_names, "dropped_names": c.dropped_names,
        "redundant_names": c.redundant_names, "scope": c.scope.to_dict(),
    }


def group_id(result: TensorResult) -> str:
    """The test-case stem a tensor belongs to: its block's test_id, else <component stem>_toplevel."""
    block = result.block_id
    if block is not None:
        return block
    component = COMPONENTS.get(result.component)
    stem = component.test_stem if component is not None else result.component
    return "pipeline" if result.component == "pipeline" else f"{stem}_toplevel"


def block_groups(results: list[TensorResult]) -> list[dict[str, Any]]:
    """One entry per (group, component, invocation) in first-seen order; extra tensors are left out."""
    groups: dict[tuple[str, str, str], list[TensorResult]] = {}
    for result in results:
        if result.status == "extra":
            continue
        groups.setdefault((group_id(result), result.component, result.invocation), []).append(result)
    out = []
    for (gid, component, invocation), rows in groups.items():
        counts = {}
        for row in rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        bad = [r for r in rows if r.status in _GROUP_BAD]
        if bad:
            status = "fail"
        elif all(r.status == "skipped" for r in rows):
            status = "skipped"
        else:
            status = "pass"
        judged = [r for r in rows if r.decision is not None]
        worst = max(bad, key=_badness) if bad else (max(judged, key=lambda r: r.ratio) if judged else None)
        out.append({
            "id": gid, "component": component, "invocation": invocation,
            "step": rows[0].step, "status": status, "tensors": len(rows), "counts": counts,
            "first_index": rows[0].index, "worst_index": worst.index if worst is not None else None,
            "worst_key": worst.key if worst is not None else None,
            "worst_ratio": worst.ratio if worst is not None else None,
        })
    return out


def _badness(result: TensorResult) -> tuple[int, float]:
    rank = {"missing": 1, "shape_mismatch": 2}.get(result.status, 0)
    return (rank, result.ratio if result.ratio is not None else 0.0)


# ---------------------------------------------------------------------------------------------------
# JSON


def jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats become the strings "Infinity", "-Infinity", "NaN"."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def summary_json_text(summary: dict[str, Any]) -> str:
    # compact: with indent, json falls back to its pure-Python encoder (seconds for a big capture)
    return json.dumps(jsonable(summary), separators=(",", ":"), allow_nan=False)


def write_summary_json(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    return write_atomic(path, summary_json_text(summary))


# ---------------------------------------------------------------------------------------------------
# JUnit


def junit_text(summary: dict[str, Any]) -> str:
    """One <testcase> per block (or top-level group) per invocation; failures name the worst tensor."""
    suites = ET.Element("testsuites", name="parity")
    _suite(suites, "parity", summary["blocks"], summary["tensors"], summary["timing"]["seconds"])
    if summary.get("isolated"):
        iso = summary["isolated"]
        _suite(suites, "parity-isolated", iso["blocks"], iso["tensors"], iso["timing"]["seconds"])
    return xml_document(suites)


def write_junit(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    return write_atomic(path, junit_text(summary))


def xml_document(root: ET.Element) -> str:
    """The tree as an XML document that any parser reads: characters XML cannot hold are escaped."""
    for element in root.iter():
        element.attrib.update((name, xml_safe(value)) for name, value in element.attrib.items())
        if element.text:
            element.text = xml_safe(element.text)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _suite(parent: ET.Element, name: str, groups: list[dict], rows: list[dict], seconds: float) -> None:
    failures = sum(1 for g in groups if g["status"] == "fail")
    skipped = sum(1 for g in groups if g["status"] == "skipped")
    suite = ET.SubElement(parent, "testsuite", name=name, tests=str(len(groups)), failures=str(failures),
                          errors="0", skipped=str(skipped), time=f"{seconds:.3f}")
    for group in groups:
        case = ET.SubElement(suite, "testcase", classname=f"{name}.{group['component']}",
                             name=f"{group['id']}[{group['invocation']}]", time="0")
        worst = rows[group["worst_index"]] if group["worst_index"] is not None else None
        if group["status"] == "fail" and worst is not None:
            failure = ET.SubElement(case, "failure", message=_failure_message(worst, group),
                                    type=worst["status"])
            failure.text = _failure_details(worst, group, rows)
        elif group["status"] == "skipped":
            note = worst["notes"][-1] if worst is not None and worst["notes"] else "skipped by an override"
            ET.SubElement(case, "skipped", message=note)


def _failure_message(row: dict, group: dict) -> str:
    bad = sum(group["counts"].get(s, 0) for s in _GROUP_BAD)
    head = f"{bad} of {group['tensors']} tensors diverge; worst {row['key']}"
    if row["status"] == "missing":
        return f"{head}: missing from the candidate"
    if row["status"] == "shape_mismatch":
        return f"{head}: shape {row['cand_shape']} vs reference {row['ref_shape']}"
    return f"{head}: {metric_line(row)}; threshold: {threshold_line(row)}"


def _failure_details(row: dict, group: dict, rows: list[dict]) -> str:
    lines = [f"worst tensor: {printable(row['key'])} (status {row['status']}, ratio {_num(row['ratio'])})"]
    if row["metrics"] is not None:
        lines.append("metrics: " + json.dumps(jsonable(row["metrics"]), sort_keys=True))
    if row["threshold"] is not None:
        lines.append("threshold: " + json.dumps(jsonable(row["threshold"]["criteria"]), sort_keys=True))
    lines += [f"note: {printable(n)}" for n in row["notes"]]
    others = [r for r in rows if r["group"] == group["id"] and r["invocation"] == group["invocation"]
              and r["component"] == group["component"] and r["status"] in _GROUP_BAD and r is not row]
    for other in others[:20]:
        lines.append(f"also {other['status']}: {printable(other['key'])} ratio {_num(other['ratio'])}")
    if len(others) > 20:
        lines.append(f"... and {len(others) - 20} more")
    return "\n".join(lines)


def metric_line(row: dict) -> str:
    m = row["metrics"]
    if m is None:
        return row["status"]
    if m["kind"] == "exact":
        return f"{m['mismatches']} of {m['numel']} elements differ, max |diff| {_num(m['max_abs'])}"
    return (f"max_abs {_num(m['max_abs'])}, max_rel {_num(m['max_rel'])}, rel_l2 {_num(m['rel_l2'])}, "
            f"ulp_max {m['ulp_max']}, violations {m['allclose_violations']}/{m['finite']}"
            + (f", nonfinite_mismatch {m['nonfinite_mismatch']}" if m["nonfinite_mismatch"] else ""))


def threshold_line(row: dict, with_reason: bool = True) -> str:
    t = row["threshold"]
    if t is None:
        return "-"
    s = t["settings"]
    if t["mode"] == "normwise":
        text = (f"{s['dtype']} ||c-r|| <= rtol {_num(s['rtol'])} ||r|| + atol {_num(s['atol'])} sqrt(n) "
                f"(rel_l2 {_num(s['rel_l2'])}), outlier limit {_num(s['outlier_limit'])}")
    elif t["mode"] == "derived":
        text = f"derived: {s['derived_from']}"
    elif t["mode"] == "calibrated":
        text = (f"calibrated {s['statistic']} <= {_num(s['k'])} x ref {_num(s['ref_error'])} + floor "
                f"{_num(s['floor'])} = {_num(s['limit'])} (candidate {_num(s['cand_error'])})")
    else:
        text = "exact equality" if not s.get("atol") else f"integers within {_num(s['atol'])}"
    if t.get("override"):
        text += f" [override {t['override']['pattern']!r}: {t['override']['reason']}]"
    if with_reason and not t["passed"]:
        text += f"; failed: {t['reason']}"
    return text


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------------
# terminal table


def format_table(summary: dict[str, Any], top: int = 10, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((120, 24)).columns
    runs = summary["runs"]
    lines = [f"parity compare: {runs['reference']['name']} (reference) vs {runs['candidate']['name']} (candidate)"]
    if runs["oracle"]:
        lines.append(f"  calibrated against oracle {runs['oracle']['name']}")
    if runs["isolated"]:
        lines.append(f"  isolated-mode candidate {runs['isolated']['name']}")
    verdict = summary["verdict"]
    lines.append(f"verdict: {verdict['status'].upper()}: {verdict['text']}")
    cov = summary["coverage"]
    counts = cov["counts"]
    lines.append("tensors: " + ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in counts if counts[s])
                 + f" (reference {cov['ref_tensors']}, candidate {cov['cand_tensors']})")
    if cov["missing_invocations"]:
        lines.append(f"missing invocations: {_list(cov['missing_invocations'])}")
    if cov["extra_invocations"]:
        lines.append(f"extra invocations: {_list(cov['extra_invocations'])}")
    if cov["dtype_differences"]:
        pairs = sorted({(d["ref_dtype"], d["cand_dtype"]) for d in cov["dtype_differences"]})
        lines.append(f"dtype differences: {len(cov['dtype_differences'])} tensors "
                     f"({', '.join(f'{a}->{b}' for a, b in pairs)}), compared after casting")
    if cov["unmatched_names"]:
        lines.append(f"name map: {len(cov['unmatched_names'])} candidate names matched no rule "
                     f"(e.g. {cov['unmatched_names'][0]})")
    for kind in (summary.get("diagnosis") or {}).get("kinds", []):
        lines.append(f"diagnosis: {kind['text']} ({kind['tensors']} tensors); fix: {kind['fix']}")
    for culprit in summary["culprits"]:
        worst = culprit["worst"]
        lines.append(f"culprit in isolation: {culprit['block']} ({culprit['component']}.{culprit['path']}) in "
                     f"{_list(culprit['invocations'])}; worst {worst['key']} ratio {_num(worst['ratio'])}")
    for deviation in (summary.get("deviations") or {}).get("deviations", []):
        lines.append(f"deviation {deviation['pattern']!r} {deviation['status'].replace('_', ' ')}: worst "
                     f"{deviation['worst'] or '-'} ratio {_num(deviation['worst_ratio'])} (limit {_num(deviation['limit'])}); "
                     f"{deviation['reason']}")
    if summary.get("baseline"):
        lines.append(f"baseline {summary['baseline']['path']}: {summary['baseline']['text']}")
    rows = summary["tensors"]
    bad = [r for r in rows if r["status"] in _GROUP_BAD]
    if bad:
        title = "worst tensors"
        shown = sorted(bad, key=lambda r: (-{"missing": 1, "shape_mismatch": 2}.get(r["status"], 0),
                                           -_sortable(r["ratio"]), r["index"]))[:top]
    else:
        title = "closest to their thresholds"
        shown = sorted((r for r in rows if r["ratio"] is not None), key=lambda r: -_sortable(r["ratio"]))[:top]
    if shown:
        lines.append(f"{title}:")
        key_width = max(24, min(70, width - 70))
        lines.append(f"  {'status':<14} {'ratio':>8}  {'tensor':<{key_width}} {'dtype':<17} {'max_abs':>9} "
                     f"{'rel_l2':>9} {'ulp_max':>9}")
        for row in shown:
            m = row["metrics"] or {}
            dtype = row["cand_dtype"] or row["ref_dtype"] or "-"
            if row["cand_dtype"] and row["ref_dtype"] and row["cand_dtype"] != row["ref_dtype"]:
                dtype = f"{row['cand_dtype']}/{row['ref_dtype']}"
            lines.append(f"  {row['status']:<14} {_num(row['ratio']):>8}  {_clip(row['key'], key_width):<{key_width}} "
                         f"{dtype:<17} {_num(m.get('max_abs')):>9} {_num(m.get('rel_l2')):>9} "
                         f"{_num(m.get('ulp_max')):>9}")
            if row["status"] == "fail" and row["threshold"]:
                detail = f"failed {row['threshold']['reason']} | {threshold_line(row, with_reason=False)}"
                lines.append(f"  {'':<14} {'':>8}  {_clip_right(detail, max(40, width - 28))}")
    for warning in summary["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(printable(line) for line in lines)  # one table line per line, whatever a name holds


def _sortable(value) -> float:
    if value is None:
        return -1.0
    if isinstance(value, str):
        return math.inf if value == "Infinity" else -1.0
    return value if not math.isnan(value) else math.inf


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _clip_right(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _list(items: list[str], limit: int = 6) -> str:
    head = ", ".join(items[:limit])
    return head + (f" … (+{len(items) - limit})" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------
# files


def render_outputs(summary: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write every output file of a comparison into out_dir and return their paths: summary.json,
    junit.xml and the HTML report (rendered from the same summary dict that summary.json holds),
    replaced as one set: summary.json exists only beside the junit.xml and report.html of its run."""
    from .html import REPORT_FILE  # the report package imports this module
    from .html.render import render_report

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out) from exc
    files = {SUMMARY_FILE: summary_json_text(summary), JUNIT_FILE: junit_text(summary),
             REPORT_FILE: render_report(summary)}
    return write_set(out, files, marker=SUMMARY_FILE)
