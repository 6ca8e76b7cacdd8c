"""Outputs over several cases: one JSON index, one merged JUnit file (the HTML index is in report/)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from sd_parity.cases.case import CaseResult
from .summary import JUNIT_FILE, SUMMARY_FILE, _atomic_write  # noqa: PLC2701 - one package


def index_dict(results: list[CaseResult], title: str) -> dict:
    return {
        "title": title,
        "status": "parity" if all(r.passed for r in results) else "divergence",
        "cases": [{
            "name": r.case.name,
            "status": r.summary["verdict"]["status"],
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


def write_index_json(index: dict, path: Path) -> Path:
    return _atomic_write(path, json.dumps(index, indent=2, sort_keys=False) + "\n")


def write_merged_junit(results: list[CaseResult], path: Path) -> Path:
    merged = ET.Element("testsuites", name="parity")
    for result in results:
        root = ET.parse(result.out_dir / JUNIT_FILE).getroot()
        for suite in root.iter("testsuite"):
            suite.set("name", f"{result.case.name}.{suite.get('name', '')}")
            merged.append(suite)
    for attribute in ("tests", "failures", "errors", "skipped"):
        merged.set(attribute, str(sum(int(s.get(attribute, 0)) for s in merged)))
    ET.indent(merged)
    return _atomic_write(path, ET.tostring(merged, encoding="unicode", xml_declaration=True) + "\n")
