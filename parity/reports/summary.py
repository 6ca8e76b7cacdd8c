"""What `parity compare` writes: summary.json, details.json.gz, junit.xml and the terminal table.

docs/summary-format.md is the normative description of summary.json (SCHEMA_VERSION below) and
docs/summary.schema.json its JSON Schema. In memory a summary is one dict (`build_summary`); on disk
the per-tensor rows and the report's drill-down data go to details.json.gz beside summary.json, so
summary.json stays small; `load_summary` joins the two again. `render_outputs(summary, out_dir)` is
the single place that writes files for a comparison: the HTML report hooks in there, and the files
are replaced as one set (sd_parity.outputs.write_set). Names are data: the terminal table and
junit.xml show non-printable characters escaped (sd_parity.escaping); the JSON files keep them as
they are.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sd_parity.errors import BadInput
from sd_parity.escaping import printable
from sd_parity.impl.families import COMPONENTS
from sd_parity.judging.compare import Comparison, TensorResult
from sd_parity.judging.diagnosis import clause as diagnosis_clause
from sd_parity.judging.overflow import overflow_clause, reference_overflow
from sd_parity.judging.scope import scope_clause
from sd_parity.outputs import output_error, write_set
from sd_parity.judging.verdict import Culprit, Verdict, describe_location, verdict_dict
from .statuses import TERMINAL_STYLES, terminal_style, verdict_tone

SCHEMA_VERSION = 2
SUMMARY_FILE = "summary.json"
DETAILS_FILE = "details.json.gz"
JUNIT_FILE = "junit.xml"
# Keys of a summary that hold per-tensor and drill-down data: in details.json.gz on disk.
DETAIL_KEYS = ("tensors", "drilldowns")
# What a summary.json must hold to be rendered (besides what details.json.gz adds).
REQUIRED = ("verdict", "first_divergence", "culprits", "runs", "mode", "config", "coverage", "warnings", "blocks",
            "isolated", "details")
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


def split_summary(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what summary.json holds, what details.json.gz holds): the rows and drill-downs go to the details."""
    isolated = summary.get("isolated")
    head = {key: value for key, value in summary.items() if key not in DETAIL_KEYS}
    if isolated is not None:
        head["isolated"] = {key: value for key, value in isolated.items() if key != "tensors"}
    head["details"] = {"file": DETAILS_FILE, "tensors": len(summary["tensors"]),
                       "isolated_tensors": len(isolated["tensors"]) if isolated is not None else None}
    details = {"schema_version": SCHEMA_VERSION, "tensors": summary["tensors"],
               "isolated_tensors": isolated["tensors"] if isolated is not None else None,
               "drilldowns": summary.get("drilldowns")}
    return head, details


def join_summary(head: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The one-dict summary from summary.json and details.json.gz (inverse of split_summary)."""
    summary = {key: value for key, value in head.items() if key != "details"}
    summary["tensors"] = details["tensors"]
    if head.get("isolated") is not None:
        summary["isolated"] = {**head["isolated"], "tensors": details["isolated_tensors"]}
    if details.get("drilldowns") is not None:
        summary["drilldowns"] = details["drilldowns"]
    return summary


def summary_files(summary: dict[str, Any]) -> dict[str, str | bytes]:
    """{file name: content} of summary.json and details.json.gz."""
    head, details = split_summary(summary)
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as stream:  # mtime 0: same summary, same bytes
        stream.write(summary_json_text(details).encode("utf-8"))
    return {SUMMARY_FILE: summary_json_text(head), DETAILS_FILE: packed.getvalue()}


def write_summary(summary: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """summary.json and its details file into out_dir, replaced as one set (no HTML, no JUnit)."""
    return write_set(Path(out_dir), summary_files(summary), marker=SUMMARY_FILE)


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The summary written to `path` (summary.json, with the details file beside it) as one dict, or
    BadInput saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist or is not a file; give the summary.json that parity compare or "
                       "parity run wrote")
    head = _read_json(path, lambda: path.read_text(encoding="utf-8"))
    if not isinstance(head, dict) or head.get("schema_version") != SCHEMA_VERSION:
        found = head.get("schema_version") if isinstance(head, dict) else type(head).__name__
        raise BadInput(f"{path} is not a summary.json of schema version {SCHEMA_VERSION} (found {found!r}); "
                       "compare the runs again with this version")
    missing = [key for key in REQUIRED if key not in head]
    if missing:
        raise BadInput(f"{path} lacks {', '.join(missing)}: not a complete summary.json")
    details_path = path.parent / str(head["details"].get("file", DETAILS_FILE) if isinstance(head["details"], dict)
                                     else DETAILS_FILE)
    if details_path.parent != path.parent or not details_path.is_file():
        raise BadInput(f"{details_path} is missing: summary.json's tensor rows and drill-down data are in it; keep "
                       "the two files together")
    details = _read_json(details_path, lambda: gzip.decompress(details_path.read_bytes()).decode("utf-8"))
    if not isinstance(details, dict) or not isinstance(details.get("tensors"), list):
        raise BadInput(f"{details_path} is not the details file of a summary.json")
    return join_summary(head, details)


def _read_json(path: Path, read) -> Any:
    try:
        return json.loads(read())
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # gzip errors are OSError/EOFError
        raise BadInput(f"{path} is not readable JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# lines about a row, for the terminal, JUnit and the HTML report


def metric_line(row: dict) -> str:
    m = row["metrics"]
    if m is None:
        return row["status"]
    if m["kind"] == "exact":
        return f"{m['mismatches']} of {m['numel']} elements differ, max |diff| {number_text(m['max_abs'])}"
    return (f"max_abs {number_text(m['max_abs'])}, max_rel {number_text(m['max_rel'])}, rel_l2 {number_text(m['rel_l2'])}, "
            f"ulp_max {number_text(m['ulp_max'])}, violations {m['allclose_violations']}/{m['finite']}"
            + (f", nonfinite_mismatch {m['nonfinite_mismatch']}" if m["nonfinite_mismatch"] else ""))


def threshold_line(row: dict, with_reason: bool = True) -> str:
    t = row["threshold"]
    if t is None:
        return "-"
    s = t["settings"]
    if t["mode"] == "normwise":
        text = (f"{s['dtype']} ||c-r|| <= rtol {number_text(s['rtol'])} ||r|| + atol {number_text(s['atol'])} sqrt(n) "
                f"(rel_l2 {number_text(s['rel_l2'])}), outlier limit {number_text(s['outlier_limit'])}")
    elif t["mode"] == "derived":
        text = f"derived: {s['derived_from']}"
    elif t["mode"] == "image_levels":
        text = (f"8-bit image within {number_text(s['atol'])} level(s) of "
                f"{'the oracle' if s.get('calibrated') else 'the reference'}, on a {s['quantile']} share of pixels")
    elif t["mode"] == "calibrated":
        text = (f"calibrated {s['statistic']} <= {number_text(s['k'])} x ref {number_text(s['ref_error'])} + floor "
                f"{number_text(s['floor'])} = {number_text(s['limit'])} (candidate {number_text(s['cand_error'])})")
    else:
        text = "exact equality" if not s.get("atol") else f"integers within {number_text(s['atol'])}"
    if t.get("override"):
        text += f" [override {t['override']['pattern']!r}: {t['override']['reason']}]"
    if with_reason and not t["passed"]:
        text += f"; failed: {t['reason']}"
    return text


def number_text(value) -> str:
    """A summary number as people read it: 3 significant digits, large counts (ULPs) as 2.06e9."""
    if value is None:
        return "-"
    if isinstance(value, str) or isinstance(value, bool):
        return str(value)
    if isinstance(value, int) and abs(value) < 100_000:
        return str(value)
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if value == 0:
        return "0"
    mantissa, _, exponent = f"{value:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


# ---------------------------------------------------------------------------------------------------
# terminal table


def format_table(summary: dict[str, Any], top: int = 10, width: int | None = None, color: bool = False) -> str:
    """The verdict and the worst tensors as the terminal shows them (rich). `width` None: no limit, so
    no line is ever folded (logs, pipes); on a terminal, its width, and a long tensor key folds onto the
    next line rather than being cut. `color`: ANSI colours by status (statuses.py)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=io.StringIO(), width=width or 100_000, force_terminal=color, no_color=not color,
                      color_system="standard" if color else None, highlight=False, emoji=False, soft_wrap=width is None)
    say = lambda *parts: console.print(Text.assemble(*parts))  # noqa: E731 - Text: names are never markup
    runs = summary["runs"]
    say(f"parity compare: {printable(runs['reference']['name'])} (reference) vs "
        f"{printable(runs['candidate']['name'])} (candidate)")
    if runs["oracle"]:
        say(f"  calibrated against oracle {printable(runs['oracle']['name'])}")
    if runs["isolated"]:
        say(f"  isolated-mode candidate {printable(runs['isolated']['name'])}")
    verdict = summary["verdict"]
    say("verdict: ", (verdict["status"].upper(), TERMINAL_STYLES[verdict_tone(verdict)]),
        f": {printable(verdict['text'])}")
    for line in _facts_lines(summary):
        say(printable(line))
    shown, title = _table_rows(summary["tensors"], top)
    if shown:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for name in ("status", "ratio", "max |d|", "rel-L2", "ULP max"):
            table.add_column(name, justify="left" if name == "status" else "right", no_wrap=True)
        table.add_column("dtype", no_wrap=True)
        table.add_column("tensor", overflow="fold")
        for row in shown:
            m = row["metrics"] or {}
            dtype = row["cand_dtype"] or row["ref_dtype"] or "-"
            if row["cand_dtype"] and row["ref_dtype"] and row["cand_dtype"] != row["ref_dtype"]:
                dtype = f"{row['cand_dtype']}/{row['ref_dtype']}"
            tensor = Text(printable(row["key"]))
            if row["status"] == "fail" and row["threshold"]:  # the threshold's settings are in the report
                tensor.append(f"\nfailed {printable(row['threshold']['reason'])}", style="dim")
            ulp = number_text(m.get("ulp_max")) if row["status"] != "pass" else "·"  # ULPs near 0 mislead
            table.add_row(Text(row["status"], style=terminal_style(row["status"])), number_text(row["ratio"]),
                          number_text(m.get("max_abs")), number_text(m.get("rel_l2")), ulp, dtype, tensor)
        console.print(table)
    for warning in summary["warnings"]:
        say(("warning: ", "yellow"), printable(warning))
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())  # no padding at ends


def _facts_lines(summary: dict[str, Any]) -> list[str]:
    cov = summary["coverage"]
    counts = cov["counts"]
    lines = ["tensors: " + ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in counts if counts[s])
             + f" (reference {cov['ref_tensors']}, candidate {cov['cand_tensors']})"]
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
                     f"{_list(culprit['invocations'])}; worst {worst['key']} ratio {number_text(worst['ratio'])}")
    for deviation in (summary.get("deviations") or {}).get("deviations", []):
        lines.append(f"deviation {deviation['pattern']!r} {deviation['status'].replace('_', ' ')}: worst "
                     f"{deviation['worst'] or '-'} ratio {number_text(deviation['worst_ratio'])} "
                     f"(limit {number_text(deviation['limit'])}); {deviation['reason']}")
    if summary.get("baseline"):
        lines.append(f"baseline {summary['baseline']['path']}: {summary['baseline']['text']}")
    return lines


def _table_rows(rows: list[dict], top: int) -> tuple[list[dict], str]:
    """The rows the table lists: the worst divergent ones, else those closest to their thresholds."""
    bad = [r for r in rows if r["status"] in _GROUP_BAD]
    if bad:
        return sorted(bad, key=lambda r: (-{"missing": 1, "shape_mismatch": 2}.get(r["status"], 0),
                                          -_sortable(r["ratio"]), r["index"]))[:top], "worst tensors"
    judged = sorted((r for r in rows if r["ratio"] is not None), key=lambda r: -_sortable(r["ratio"]))
    return judged[:top], "closest to their thresholds"


def _sortable(value) -> float:
    if value is None:
        return -1.0
    if isinstance(value, str):
        return math.inf if value == "Infinity" else -1.0
    return value if not math.isnan(value) else math.inf


def _list(items: list[str], limit: int = 6) -> str:
    head = ", ".join(items[:limit])
    return head + (f" … (+{len(items) - limit})" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------
# files


def render_outputs(summary: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write every output file of a comparison into out_dir and return their paths: summary.json,
    details.json.gz, junit.xml and the HTML report (rendered from the same summary dict), replaced as
    one set: summary.json exists only beside the other files of its run."""
    from .html import REPORT_FILE  # the report package imports this module
    from .html.render import render_report

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out) from exc
    from .junit import junit_text

    files = {**summary_files(summary), JUNIT_FILE: junit_text(summary), REPORT_FILE: render_report(summary)}
    return write_set(out, files, marker=SUMMARY_FILE)
