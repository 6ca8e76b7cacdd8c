"""From a comparison to one coherent verdict: whether the runs agree, where they first part, and which
blocks are to blame.

- The FIRST DIVERGENCE is the first tensor, in the reference's execution order, whose status is
  fail or shape_mismatch in the (free) comparison.
- Given an isolated-mode comparison too (every block fed the reference's captured inputs, every
  pipeline stage the reference's tensors), the CULPRITS are the blocks (naming.block_of) with an
  output tensor (the block's own output or any module output inside it) that still fails. A block
  is only blamed if the isolated run really fed it the reference's inputs (judging.isolation).
- Status, one of:
    "parity"          nothing divergent, nothing missing, no culprit in isolation (`identical` when
                      every tensor is bit for bit the reference's);
    "divergence"      something divergent in the free comparison;
    "isolation_only"  the free comparison passes but, fed the reference's inputs, a block or stage
                      exceeds its threshold: a real error that the free run's accumulated tolerance
                      hides. It fails (exit 1) unless the config sets isolation_only = "pass";
    "incomplete"      nothing divergent, but reference tensors missing from the candidate.
  Exit codes: 0 for parity (and a tolerated isolation_only), 1 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .compare import Comparison, TensorResult
from .cross_device import device_pair
from .isolation import IsolationCheck, check_isolation

EXIT_PARITY = 0
EXIT_DIVERGENCE = 1


@dataclass
class Culprit:
    block: str  # Block.test_id, e.g. unet_block_3_down
    component: str
    path: str  # module path of the block, e.g. down_blocks.3
    invocations: list[str]
    failing_tensors: int
    worst: TensorResult  # the failing output tensor with the largest ratio (in the isolated comparison)


@dataclass
class Verdict:
    status: str  # "parity" | "divergence" | "isolation_only" | "incomplete"
    text: str
    first_divergence: TensorResult | None
    culprits: list[Culprit] = field(default_factory=list)
    isolated_failures_outside_blocks: list[TensorResult] = field(default_factory=list)
    isolated_given: bool = False
    first_block_is_culprit: bool | None = None  # None: no isolated run, or the divergence is outside blocks
    identical: bool = False  # parity with every tensor bit-identical to the reference
    not_isolated: list[str] = field(default_factory=list)  # blocks the isolated run did not feed the reference's inputs
    exit_code: int = EXIT_DIVERGENCE


def describe_location(result: TensorResult) -> str:
    where = f"{result.component}/{result.invocation}/{result.name}"
    block = result.block_id
    if not block:
        return where
    return f"{where} (input of block {block})" if result.kind == "input" else f"{where} (block {block})"


def find_culprits(isolated: Comparison, check: IsolationCheck | None = None
                  ) -> tuple[list[Culprit], list[TensorResult]]:
    """Blocks whose output tensors fail when fed the reference's inputs, in first-failure order, and the
    failing tensors outside blocks (pipeline stages, component inputs, top-level modules)."""
    check = check if check is not None else check_isolation(isolated)
    groups: dict[tuple[str, str], list[TensorResult]] = {}
    outside: list[TensorResult] = []
    for result in isolated.results:
        # A block's inputs in an isolated run are the reference's own (judging.isolation checks that);
        # a component's inputs (@z, ...) are what the candidate's pipeline stages computed, so they count.
        if not result.divergent or (result.kind == "input" and result.block is not None):
            continue
        block = result.block
        if block is None:
            outside.append(result)
        elif not check.breached(block.component, block.path):
            groups.setdefault((block.component, block.path), []).append(result)
    culprits = []
    for (component, path), failures in groups.items():
        invocations = list(dict.fromkeys(r.invocation for r in failures))
        worst = max(failures, key=_severity)
        culprits.append(Culprit(block=failures[0].block_id, component=component, path=path,
                                invocations=invocations, failing_tensors=len(failures), worst=worst))
    return culprits, outside


def _severity(result: TensorResult) -> tuple[int, float]:
    if result.status == "shape_mismatch":
        return (1, 0.0)
    return (0, result.ratio if result.ratio is not None else 0.0)


def make_verdict(comparison: Comparison, isolated: Comparison | None = None) -> Verdict:
    check = check_isolation(isolated) if isolated is not None else IsolationCheck()
    culprits, outside = find_culprits(isolated, check) if isolated is not None else ([], [])
    notes = [check.describe()] if check.breaches else []
    if check.unverified:
        notes.append(f"the isolated run recorded no inputs for {', '.join(check.unverified[:3])}"
                     f"{' and others' if len(check.unverified) > 3 else ''}, so their isolation is unverified")
    first = comparison.first_divergence()
    if first is None:
        verdict = _without_divergence(comparison, isolated, culprits, outside)
    else:
        verdict = _divergence(comparison, isolated, first, culprits, outside)
    verdict.not_isolated = check.breached_blocks()
    verdict.text += _devices_note(comparison)
    if notes:
        verdict.text += "; " + "; ".join(notes)
    return verdict


def _without_divergence(comparison: Comparison, isolated: Comparison | None, culprits: list[Culprit],
                        outside: list[TensorResult]) -> Verdict:
    coverage = comparison.coverage
    passed = coverage.counts["pass"]
    extras = []
    if coverage.counts["skipped"]:
        extras.append(f"{coverage.counts['skipped']} skipped by overrides")
    if coverage.counts["extra"]:
        extras.append(f"{coverage.counts['extra']} only in the candidate")
    tail = f" ({'; '.join(extras)})" if extras else ""
    common = dict(first_divergence=None, culprits=culprits, isolated_failures_outside_blocks=outside,
                  isolated_given=isolated is not None)
    if coverage.counts["missing"]:
        text = (f"incomplete: {coverage.counts['missing']} reference tensor(s) missing from the candidate "
                f"(first: {coverage.missing[0]}); {passed} compared tensors within tolerance{tail}")
        return Verdict(status="incomplete", text=text, exit_code=EXIT_DIVERGENCE, **common)
    if culprits or outside:
        blamed = [c.block for c in culprits] + [r.key for r in outside[:3]]
        tolerated = comparison.tolerances.isolation_only == "pass"
        text = (f"divergence in isolation only: fed the reference's inputs, {', '.join(blamed)} exceed their "
                f"thresholds, while the free run's {passed} tensors stay within its tolerance"
                + (" (isolation_only = \"pass\" in the config: not a failure)" if tolerated else ""))
        return Verdict(status="isolation_only", text=text, exit_code=EXIT_PARITY if tolerated else EXIT_DIVERGENCE,
                       **common)
    identical = comparison.identical()
    if identical:
        text = f"identical: all {passed} tensors bit for bit the reference's{tail}"
        if isolated is not None and not isolated.identical():
            text += "; the isolated run is within tolerance"
    else:
        text = f"parity: {passed} tensors within tolerance{tail}"
    return Verdict(status="parity", text=text, identical=identical, exit_code=EXIT_PARITY, **common)


def _divergence(comparison: Comparison, isolated: Comparison | None, first: TensorResult,
                culprits: list[Culprit], outside: list[TensorResult]) -> Verdict:
    where = describe_location(first)
    # A block's input diverging says nothing about the block itself: judge it like a tensor outside blocks.
    block_id = first.block_id if first.kind != "input" else None
    is_culprit = None
    if isolated is None:
        text = (f"first divergence at {where}; give an isolated-mode candidate run (--isolated) to tell a "
                "culprit block from accumulated error")
    elif block_id is not None:
        is_culprit = any(c.block == block_id and c.component == first.component for c in culprits)
        others = [c.block for c in culprits if not (c.block == block_id and c.component == first.component)]
        if is_culprit:
            text = f"first divergence at {where}; its block {block_id} is a culprit in isolation"
            if others:
                text += f" (other culprits: {', '.join(others)})"
        elif not culprits and not outside:
            text = f"first divergence at {where}; error accumulates: no block exceeds its threshold alone"
        else:
            blamed = others + [r.key for r in outside[:3]]
            text = (f"first divergence at {where}; {block_id} passes in isolation, so its error comes from "
                    f"upstream; culprits in isolation: {', '.join(blamed)}")
    else:
        same = next((r for r in outside if r.key == first.key), None)
        if same is not None:
            text = f"first divergence at {where}, not a block output; it diverges in isolation too"
        elif not culprits and not outside:
            text = f"first divergence at {where}; error accumulates: no block exceeds its threshold alone"
        else:
            blamed = [c.block for c in culprits] + [r.key for r in outside[:3]]
            text = (f"first divergence at {where}, not a block output; it passes in isolation; culprits in "
                    f"isolation: {', '.join(blamed)}")
    count = len(comparison.divergent())
    if count > 1:
        text += f" [{count} divergent tensors in all]"
    return Verdict(status="divergence", text=text, first_divergence=first, culprits=culprits,
                   isolated_failures_outside_blocks=outside, isolated_given=isolated is not None,
                   first_block_is_culprit=is_culprit, exit_code=EXIT_DIVERGENCE)


def _devices_note(comparison: Comparison) -> str:
    pair = device_pair(comparison.ref_metadata, comparison.cand_metadata)
    return f" [cross-device: {pair[0]} reference, {pair[1]} candidate]" if pair else ""


def verdict_dict(verdict: Verdict) -> dict[str, Any]:
    return {"status": verdict.status, "text": verdict.text, "exit_code": verdict.exit_code,
            "identical": verdict.identical, "not_isolated": verdict.not_isolated,
            "isolated_given": verdict.isolated_given, "first_block_is_culprit": verdict.first_block_is_culprit}
