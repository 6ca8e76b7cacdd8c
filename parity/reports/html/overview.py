"""The top of a case's report: verdict in plain words, the run's facts, what to do next, how to reproduce."""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from sd_parity.reports.statuses import headline, verdict_label, verdict_tone
from sd_parity.reports.summary import jsonable, metric_line, threshold_line
# (label, metadata field) shown from the run files' metadata
FACTS = (("model", "model"), ("prompt", "prompt"), ("negative prompt", "negative_prompt"), ("seed", "seed"),
         ("scheduler", "scheduler"), ("steps", "steps"), ("guidance", "guidance"), ("pipeline", "pipeline"),
         ("dtype", "dtype"), ("mode", "mode"), ("model hash", "model_hash"))
BACKENDS = ("numpy", "torch")  # our own candidates: their blocks have unit tests in sd-parity's checkout
TEST_DTYPES = ("fp32", "fp64", "fp16", "bf16")  # tests/test_impl_models.py ids: <block>-<backend>-<dtype>
SHOWN_MISSING = 5  # missing keys named in the next steps


def overview(summary: dict[str, Any]) -> dict[str, Any]:
    runs = summary["runs"]
    case = summary.get("case") or {}
    ref, cand = runs["reference"]["metadata"], runs["candidate"]["metadata"]
    first = summary["first_divergence"]
    return {
        "title": case.get("name") or f"{runs['reference']['name']} vs {runs['candidate']['name']}",
        "status": summary["verdict"]["status"],
        "tone": verdict_tone(summary["verdict"]),
        "headline": headline(verdict_label(summary["verdict"])),
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
        "next_steps": next_steps(summary),
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
    """Copy-paste commands for this case: the run (or comparison) itself, then the blocks to look at as
    tests: ours (numpy/torch) by their unit tests, a port by its own assert_parity."""
    runs = summary["runs"]
    commands = []
    if case.get("repro"):
        commands.append({"what": "rerun this case (from any folder)", "command": case["repro"]})
        if case.get("script"):
            commands.append({"what": "or run the script beside this report (writes into rerun/)",
                             "command": f"sh {shlex.quote(case['script'])}"})
    else:
        commands.append({"what": "compare the run files again (from any folder)",
                         "command": summary.get("command") or _compare_command(runs)})
    blocks = list(dict.fromkeys(([summary["first_divergence"]["block"]] if summary["first_divergence"]
                                 and summary["first_divergence"]["block"] else [])
                                + [c["block"] for c in summary["culprits"]]))
    if not blocks:
        return commands
    candidate = case.get("candidate") or cand.get("impl")
    if candidate in BACKENDS:
        narrow = [candidate] + ([cand["dtype"]] if cand.get("dtype") in TEST_DTYPES else [])
        for block in blocks:
            commands.append({"what": f"unit test of block {block} (in a checkout of sd-parity)",
                             "command": "pytest -k " + shlex.quote(" and ".join([block, *narrow]))})
    else:
        commands.append({"what": "the same blocks as a test in your port's own suite (pytest; docs/ports.md)",
                         "command": _assert_parity_snippet(summary, case, blocks)})
    return commands


def _compare_command(runs: dict) -> str:
    parts = ["parity compare", shlex.quote(_absolute(runs["reference"]["path"])),
             shlex.quote(_absolute(runs["candidate"]["path"]))]
    parts += [f"--{role} {shlex.quote(_absolute(runs[role]['path']))}" for role in ("oracle", "isolated") if runs[role]]
    return " ".join(parts)


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def _assert_parity_snippet(summary: dict, case: dict, blocks: list[str]) -> str:
    """A pytest test that checks `blocks` with sd_parity.assert_parity: re-running the candidate when
    the case names it (parity run), else on the two run files (parity compare)."""
    name_map = summary["config"].get("name_map") or {}
    maps = [str(m) for m in (*name_map.get("sources", ()), *name_map.get("builtins", ()))]
    only = blocks[0] if len(blocks) == 1 else blocks
    options = f"only={only!r}" + (f", map={maps[0]!r}" if len(maps) == 1 else "")
    name = "test_" + "_".join(blocks)[:60]
    if case.get("candidate"):
        fields = _config_fields(summary["runs"]["reference"]["metadata"])
        arguments = ", ".join([repr(fields.pop("model"))] + [f"{k}={v!r}" for k, v in fields.items()])
        return "\n".join([
            "import sd_parity", "", "",
            f"def {name}(parity_reference):",
            f"    ref = parity_reference({arguments})",
            f"    cand = sd_parity.run_candidate({case['candidate']!r}, ref, mode=\"isolated\")",
            f"    sd_parity.assert_parity(ref, cand, {options})"])
    runs = summary["runs"]
    files = ", ".join(repr(_absolute(runs[role]["path"])) for role in ("reference", "candidate"))
    extra = "".join(f", {role}={_absolute(runs[role]['path'])!r}" for role in ("oracle", "isolated") if runs[role])
    return "\n".join(["import sd_parity", "", "", f"def {name}():",
                      f"    sd_parity.assert_parity({files}, {options}{extra})"])


def _config_fields(metadata: dict) -> dict[str, Any]:
    """The reference run's RunConfig fields that differ from the defaults (model first; blocks captured)."""
    from sd_parity.runs.config import RunConfig, native_size

    fields = {"model": metadata.get("model", "tiny-sd1")}
    for field in dataclasses.fields(RunConfig):
        if field.name in ("model", "compression", "device") or field.name not in metadata:
            continue
        value = metadata[field.name]
        if field.name in ("height", "width") and value == native_size(fields["model"]):
            continue
        if value != field.default:
            fields[field.name] = value
    fields.setdefault("capture", "blocks")  # isolated runs need each block's inputs
    return fields


def next_steps(summary: dict[str, Any]) -> list[dict[str, str]]:
    """What to do next, from the verdict and what the comparison found: [{title, text, href}]."""
    steps: list[dict[str, str]] = []
    add = lambda title, text, href="": steps.append({"title": title, "text": text, "href": href})  # noqa: E731
    verdict, coverage = summary["verdict"], summary["coverage"]
    first, culprits = summary["first_divergence"], summary["culprits"]
    for kind in (summary.get("diagnosis") or {}).get("kinds", []):
        add(f"Fix a known porting mistake in {kind['component']}: {kind['kind'].replace('_', ' ')}",
            f"{kind['text']} ({kind['tensors']} tensors, first {kind['first']}). Fix: {kind['fix']}")
    for culprit in culprits:
        add(f"Look at block {culprit['block']} ({culprit['component']}.{culprit['path']})",
            f"It fails on its own when fed the reference's inputs, in {len(culprit['invocations'])} invocation(s); "
            f"its worst tensor is {culprit['worst']['key']}: {metric_line(jsonable(culprit['worst']))}.",
            f"#dd-isolated-{culprit['worst']['index']}")
    if first is not None and not culprits:
        if summary["mode"]["isolated_given"]:
            add("Follow the accumulated error",
                f"No block exceeds its threshold alone, yet the free run diverges from {first['key']} on: rounding "
                "error grows through the steps. Check precision (dtype, accumulation order, fused ops) where the "
                "Layer × step map warms up.", "#heatmap")
        else:
            add("Isolate the first divergence",
                f"Run the candidate block by block (parity run --mode both, or parity compare --isolated) to tell "
                f"whether {first['block'] or first['component']} is wrong itself or inherits its error.")
    if verdict["status"] == "isolation_only":
        blamed = [c["block"] for c in culprits] + [r["key"] for r in summary["isolated_failures_outside_blocks"][:3]]
        add("Fix what fails in isolation" if verdict["exit_code"] else "Decide whether to fix what fails in isolation",
            f"The free run stays within its tolerance, but fed the reference's own inputs {', '.join(blamed)} "
            "exceed their thresholds: a real error that the free run's accumulated tolerance hides. "
            + ("Fix it, or accept it with isolation_only = \"pass\" in parity.toml's [tolerances] "
               "(docs/tolerances.md)." if verdict["exit_code"] else
               "The config accepts it (isolation_only = \"pass\"), so the exit code is 0."))
    if verdict.get("not_isolated"):
        blocks = verdict["not_isolated"]
        add("Feed each block the inputs it is given",
            f"In the isolated run, {', '.join(blocks[:5])}{' …' if len(blocks) > 5 else ''} recorded inputs that are "
            "not the reference's, so those blocks were not isolated and no culprit is named there. The "
            "candidate's run_block must run the block on the inputs it receives (docs/ports.md).")
    if first is not None:
        add("Look at the first divergence", f"{first.get('location') or first['key']}: "
            f"{metric_line(jsonable(first))}.", f"#dd-free-{first['index']}")
    missing = coverage["missing"]
    if missing:
        shown = ", ".join(missing[:SHOWN_MISSING]) + (f" … (+{len(missing) - SHOWN_MISSING})" if len(missing) >
                                                       SHOWN_MISSING else "")
        add("Provide the missing tensors", f"{len(missing)} reference tensors have no counterpart: {shown}. Report "
            "them from the port, map their names (--map, parity align), or judge only what it provides "
            "(--require blocks, --only GLOB).", "#coverage")
    if coverage["unmatched_names"]:
        add("Map the candidate's names", f"{len(coverage['unmatched_names'])} candidate names matched no name-map "
            "rule: parity align REF CAND --write-map map.toml proposes rules (docs/maps.md).", "#coverage")
    if summary["warnings"]:
        add("Check the settings", "The runs differ in more than the implementation: " + summary["warnings"][0]
            + (f" (+{len(summary['warnings']) - 1} more warnings)" if len(summary["warnings"]) > 1 else ""),
            "#coverage")
    if verdict["exit_code"] == 0:
        if not summary["mode"]["calibrated"] and not verdict.get("identical"):
            add("Calibrate the thresholds", "These thresholds are the dtype's default tolerances. With an fp64 run "
                "of the reference (parity run calibrates unless --no-calibrate; parity compare --oracle), each "
                "tensor's threshold follows the reference's own rounding error, which is tighter where it can be.")
        if not steps:
            matched = "is bit for bit the reference's" if verdict.get("identical") else "is within its threshold"
            add("Keep it checked", f"Every tensor {matched}. Put the check in CI: the exit code is 0 at parity "
                "and 1 on a divergence, and junit.xml reads as one test per block.")
    return steps


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)
