"""junit.xml: the verdict as one testcase, then one testcase per block with its tensor failures inside.

A porting bug in one block makes everything downstream of it diverge in the free-running run; CI
should read that as one failure, with details, not as sixty. So a block fails on its own error only:
  * with an isolated-mode run (each block fed the reference's inputs), a block fails when it is a
    culprit there (or, outside blocks, when its tensors fail in isolation); a block that diverges
    only in the free run passes, with a note that its error is inherited;
  * without one, the block holding the first divergence fails, and blocks that diverge after it are
    skipped: their own error cannot be told apart from what they inherit;
  * a missing tensor or a shape mismatch is the candidate's own in any case, so its block fails;
  * a block the isolated run did not feed the reference's inputs (verdict.not_isolated) is skipped.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from sd_parity.escaping import printable, xml_safe
from .summary import metric_line, number_text, threshold_line

STRUCTURAL = ("missing", "shape_mismatch")  # the candidate's own, whatever happens upstream
BAD = ("fail", *STRUCTURAL)
LISTED = 20  # tensors listed in a failure's text


@dataclass
class BlockCase:
    """One block (or top-level group) over all its invocations."""

    id: str
    component: str
    rows: list[dict] = field(default_factory=list)  # the free (main) comparison's rows
    isolated_rows: list[dict] = field(default_factory=list)

    @staticmethod
    def bad(rows: list[dict], statuses: tuple[str, ...], inputs: bool = False) -> list[dict]:
        """Rows of these statuses; a block's `@` inputs only with `inputs` (elsewhere they are either the
        reference's own, in an isolated run, or inherited from upstream)."""
        return [r for r in rows if r["status"] in statuses and (inputs or r["kind"] != "input")]


def junit_text(summary: dict[str, Any]) -> str:
    """<testsuites><testsuite name="parity">: testcase `verdict`, then one testcase per block."""
    suites = ET.Element("testsuites", name="parity")
    cases = _block_cases(summary)
    judged = [_judge(case, summary) for case in cases]
    verdict = summary["verdict"]
    failures = sum(1 for outcome, _, _ in judged if outcome == "failure") + (verdict["exit_code"] != 0)
    skipped = sum(1 for outcome, _, _ in judged if outcome == "skipped")
    seconds = summary["timing"]["seconds"] + ((summary.get("isolated") or {}).get("timing") or {}).get("seconds", 0)
    suite = ET.SubElement(suites, "testsuite", name="parity", tests=str(len(cases) + 1), failures=str(failures),
                          errors="0", skipped=str(skipped), time=f"{seconds:.3f}")
    testcase = ET.SubElement(suite, "testcase", classname="parity", name="verdict", time=f"{seconds:.3f}")
    if verdict["exit_code"] != 0:
        failure = ET.SubElement(testcase, "failure", message=verdict["text"], type=verdict["status"])
        failure.text = _verdict_details(summary)
    else:
        ET.SubElement(testcase, "system-out").text = verdict["text"]
    for case, (outcome, message, text) in zip(cases, judged):
        testcase = ET.SubElement(suite, "testcase", classname=f"parity.{case.component}", name=case.id, time="0")
        if outcome == "failure":
            ET.SubElement(testcase, "failure", message=message, type="divergence").text = text
        elif outcome == "skipped":
            ET.SubElement(testcase, "skipped", message=message)
        elif message:
            ET.SubElement(testcase, "system-out").text = message
    return xml_document(suites)


def xml_document(root: ET.Element) -> str:
    """The tree as an XML document that any parser reads: characters XML cannot hold are escaped."""
    for element in root.iter():
        element.attrib.update((name, xml_safe(value)) for name, value in element.attrib.items())
        if element.text:
            element.text = xml_safe(element.text)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _block_cases(summary: dict[str, Any]) -> list[BlockCase]:
    """Block cases in first-seen order over both comparisons; candidate-only (extra) rows belong to none."""
    cases: dict[str, BlockCase] = {}
    isolated = summary.get("isolated") or {}
    for rows, attribute in ((summary["tensors"], "rows"), (isolated.get("tensors") or [], "isolated_rows")):
        for row in rows:
            if row["status"] != "extra":
                case = cases.setdefault(row["group"], BlockCase(row["group"], row["component"]))
                getattr(case, attribute).append(row)
    return list(cases.values())


def _judge(case: BlockCase, summary: dict[str, Any]) -> tuple[str, str, str]:
    """(failure | skipped | passed, message, failure text) for one block."""
    isolated_given = summary.get("isolated") is not None
    own_run_is_isolated = summary["mode"]["candidate"] == "isolated"
    structural = case.bad(case.rows, STRUCTURAL, inputs=not own_run_is_isolated)
    if own_run_is_isolated:  # an isolated run re-runs blocks and some stages: pipeline tensors may be absent
        structural = [r for r in structural if not (r["status"] == "missing" and r["component"] == "pipeline")]
    if isolated_given and case.id in summary["verdict"].get("not_isolated", ()) and not structural:
        return "skipped", ("not isolated: in the isolated run this block's recorded inputs are not the reference's, "
                           "so its own error cannot be told from what it was fed"), ""
    local = _local(case, summary) if isolated_given else []
    free_bad = case.bad(case.rows, ("fail",))
    if local or structural or (own_run_is_isolated and free_bad):
        failing = structural + (local if isolated_given else free_bad)
        where = "in isolation (fed the reference's own inputs)" if local else ""
        return "failure", _failure_message(failing, where), _failure_text(case, failing, free_bad if local else [])
    if not free_bad:
        skipped = [r for r in case.rows if r["status"] == "skipped"]
        if skipped and len(skipped) == len(case.rows):
            return "skipped", skipped[0]["notes"][-1] if skipped[0]["notes"] else "skipped by an override", ""
        return "passed", "", ""
    if isolated_given:
        return "passed", (f"{len(free_bad)} tensors diverge in the free run, but none in the isolated run (fed the "
                          f"reference's inputs): the error is inherited from upstream (worst "
                          f"{printable(_worst(free_bad)['key'])})"), ""
    first = summary["first_divergence"]
    if first is not None and first["group"] == case.id:
        return "failure", _failure_message(free_bad, "(the first divergence)"), _failure_text(case, free_bad, [])
    where = first["key"] if first is not None else "an earlier tensor"
    return "skipped", (f"{len(free_bad)} tensors diverge downstream of the first divergence at {where}; without an "
                       "isolated run (parity run --mode both, or parity compare --isolated) this block's own error "
                       "cannot be told apart from what it inherits"), ""


def _local(case: BlockCase, summary: dict[str, Any]) -> list[dict]:
    """The block's tensors that fail in the isolated run. Tensors outside blocks (a component's top-level
    modules) come from a pass through the whole component there, so one after a culprit's failing tensor
    in the same call inherits its error and does not count."""
    failing = case.bad(case.isolated_rows, ("fail", "shape_mismatch"))
    if not failing or failing[0]["block"]:  # a block's isolated tensors are its own
        return failing
    culprits = {c["block"] for c in summary["culprits"]}
    first_culprit_failure: dict[tuple[str, str], int] = {}
    for row in summary["isolated"]["tensors"]:
        if row["block"] in culprits and row["status"] in ("fail", "shape_mismatch") and row["order"] is not None:
            call = (row["component"], row["invocation"])
            first_culprit_failure[call] = min(first_culprit_failure.get(call, row["order"]), row["order"])
    return [r for r in failing if r["order"] is None
            or r["order"] < first_culprit_failure.get((r["component"], r["invocation"]), r["order"] + 1)]


def _worst(rows: list[dict]) -> dict:
    rank = {"missing": 2, "shape_mismatch": 1}
    return max(rows, key=lambda r: (rank.get(r["status"], 0), _sortable(r["ratio"])))


def _sortable(value) -> float:
    if value is None:
        return -1.0
    number = float(value)
    return float("inf") if number != number else number


def _failure_message(failing: list[dict], where: str) -> str:
    worst = _worst(failing)
    invocations = list(dict.fromkeys(r["invocation"] for r in failing))
    head = (f"{len(failing)} tensors diverge {where}".rstrip() + f" in {_span(invocations)}; worst {worst['key']}")
    if worst["status"] == "missing":
        return f"{head}: missing from the candidate"
    if worst["status"] == "shape_mismatch":
        return f"{head}: shape {worst['cand_shape']} vs reference {worst['ref_shape']}"
    return f"{head}: {metric_line(worst)}; threshold: {threshold_line(worst)}"


def _failure_text(case: BlockCase, failing: list[dict], free_bad: list[dict]) -> str:
    lines = [f"block {case.id} ({case.component}): {len(failing)} failing tensors"]
    for row in sorted(failing, key=lambda r: -_sortable(r["ratio"]))[:LISTED]:
        lines.append(f"  {row['status']:<14} ratio {number_text(row['ratio']):>8}  {printable(row['key'])}")
        if row["metrics"] is not None:
            lines.append(f"      {metric_line(row)}")
        if row["threshold"] is not None:
            lines.append(f"      threshold: {threshold_line(row)}")
        lines += [f"      diagnosis: {d['text']} (fix: {d['fix']})" for d in row.get("diagnoses", [])]
    if len(failing) > LISTED:
        lines.append(f"  ... and {len(failing) - LISTED} more")
    if free_bad:
        lines.append(f"in the free-running run, {len(free_bad)} tensors of this block diverge "
                     f"(worst {printable(_worst(free_bad)['key'])})")
    return "\n".join(lines)


def _span(invocations: list[str]) -> str:
    if len(invocations) <= 3:
        return ", ".join(invocations)
    return f"{invocations[0]} .. {invocations[-1]} ({len(invocations)} invocations)"


def _verdict_details(summary: dict[str, Any]) -> str:
    lines = []
    first = summary["first_divergence"]
    if first is not None:
        lines += [f"first divergence: {printable(first.get('location') or first['key'])}",
                  f"  {metric_line(first)}", f"  threshold: {threshold_line(first)}"]
    for culprit in summary["culprits"]:
        lines.append(f"culprit in isolation: {culprit['block']} ({culprit['component']}.{culprit['path']}), "
                     f"{culprit['failing_tensors']} failing tensors in {_span(culprit['invocations'])}")
    for kind in (summary.get("diagnosis") or {}).get("kinds", []):
        lines.append(f"diagnosis: {kind['text']} ({kind['tensors']} tensors); fix: {kind['fix']}")
    counts = summary["coverage"]["counts"]
    lines.append("tensors: " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n))
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(printable(line) for line in lines)
