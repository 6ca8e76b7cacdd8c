"""Outputs over several cases: one JSON index, one merged JUnit file (the HTML index is in report/)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from sd_parity.cases.case import CaseResult
from sd_parity.outputs import write_set
from .junit import xml_document
from .summary import JUNIT_FILE, SUMMARY_FILE


def index_dict(results: list[CaseResult], title: str) -> dict:
    return {
        "title": title,
        "status": "parity" if all(r.passed for r in results) else "divergence",
        "cases": [{
            "name": r.case.name,
            "status": r.summary["verdict"]["status"],
            "passed": r.passed,  # exit 0: parity, or a divergence the config tolerates
            "verdict": r.summary["verdict"]["text"],
            "first_divergence": r.summary.get("first_divergence"),
            "culprits": r.summary.get("culprits", []),
            "candidate": r.case.candidate,
            "dtype": r.case.config.dtype,
            "scheduler": r.case.config.scheduler,
            "pipeline": r.case.config.pipeline,
            "mode": r.case.mode,
            "calibrated": r.summary["case"]["calibrated"],
            "seconds": round(r.seconds, 2),
            "summary": str(r.out_dir / SUMMARY_FILE),
            "report": str(r.out_dir / "report.html"),
            "repro": r.summary["case"]["repro"],
        } for r in results],
    }


INDEX_JSON, INDEX_JUNIT, INDEX_HTML = "parity.json", "junit.xml", "parity.html"


def merged_junit_text(results: list[CaseResult]) -> str:
    merged = ET.Element("testsuites", name="parity")
    for result in results:
        root = ET.parse(result.out_dir / JUNIT_FILE).getroot()
        for suite in root.iter("testsuite"):
            suite.set("name", f"{result.case.name}.{suite.get('name', '')}")
            merged.append(suite)
    for attribute in ("tests", "failures", "errors", "skipped"):
        merged.set(attribute, str(sum(int(s.get(attribute, 0)) for s in merged)))
    return xml_document(merged)


def write_index_set(index: dict, results: list[CaseResult], folder: Path) -> list[Path]:
    """parity.json, junit.xml and parity.html over the cases, replaced as one set (parity.json last)."""
    from .html.render import render_index

    files = {INDEX_JSON: json.dumps(index, indent=2, sort_keys=False) + "\n", INDEX_JUNIT: merged_junit_text(results),
             INDEX_HTML: render_index(index, folder)}
    return write_set(folder, files, marker=INDEX_JSON)
