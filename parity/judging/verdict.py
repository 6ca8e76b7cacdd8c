"""From a comparison to a verdict: where the runs first diverge and which blocks are to blame.

- The FIRST DIVERGENCE is the first tensor, in the reference's execution order, whose status is
  fail or shape_mismatch.
- Given an isolated-mode comparison too (a candidate run in which every block was fed the
  reference's captured inputs and every denoising step the reference's latents), the CULPRITS are the
  blocks (naming.block_of) with an output tensor (kind "output": the block's own output or any
  module output inside it) that still fails. A block that diverges in the free run but passes in
  isolation only inherits error from upstream.
- Status: "parity" (nothing divergent, nothing missing), "divergence" (something divergent) or
  "incomplete" (nothing divergent, but reference tensors missing from the candidate). Exit codes:
  0 for parity, 1 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .compare import Comparison, TensorResult
from .cross_device import device_pair

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
    status: str  # "parity" | "divergence" | "incomplete"
    text: str
    first_divergence: TensorResult | None
    culprits: list[Culprit] = field(default_factory=list)
    isolated_failures_outside_blocks: list[TensorResult] = field(default_factory=list)
    isolated_given: bool = False
    first_block_is_culprit: bool | None = None  # None: no isolated run, or the divergence is outside blocks

    @property
    def exit_code(self) -> int:
        return EXIT_PARITY if self.status == "parity" else EXIT_DIVERGENCE


def describe_location(result: TensorResult) -> str:
    where = f"{result.component}/{result.invocation}/{result.name}"
    block = result.block_id
    if not block:
        return where
    return f"{where} (input of block {block})" if result.kind == "input" else f"{where} (block {block})"


def find_culprits(isolated: Comparison) -> tuple[list[Culprit], list[TensorResult]]:
    """Blocks whose output tensors fail when fed the reference's inputs, in first-failure order."""
    groups: dict[tuple[str, str], list[TensorResult]] = {}
    outside: list[TensorResult] = []
    for result in isolated.results:
        # A block's inputs in an isolated run are the reference's own; a component's inputs (@z, ...)
        # are what the candidate's pipeline stage computed from the reference's tensors, so they count.
        if not result.divergent or (result.kind == "input" and result.block is not None):
            continue
        block = result.block
        if block is None:
            outside.append(result)
            continue
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
    coverage = comparison.coverage
    first = comparison.first_divergence()
    culprits: list[Culprit] = []
    outside: list[TensorResult] = []
    if isolated is not None:
        culprits, outside = find_culprits(isolated)
    if first is None:
        passed = coverage.counts["pass"]
        extras = []
        if coverage.counts["skipped"]:
            extras.append(f"{coverage.counts['skipped']} skipped by overrides")
        if coverage.counts["extra"]:
            extras.append(f"{coverage.counts['extra']} only in the candidate")
        tail = f" ({'; '.join(extras)})" if extras else ""
        if coverage.counts["missing"]:
            text = (f"incomplete: {coverage.counts['missing']} reference tensor(s) missing from the candidate "
                    f"(first: {coverage.missing[0]}); {passed} compared tensors within tolerance{tail}")
            status = "incomplete"
        else:
            text = f"parity: {passed} tensors within tolerance{tail}"
            status = "parity"
        if isolated is not None and culprits:
            text += ("; but in isolation " + ", ".join(c.block for c in culprits) + " exceed their thresholds")
        text += _devices_note(comparison)
        return Verdict(status=status, text=text, first_divergence=None, culprits=culprits,
                       isolated_failures_outside_blocks=outside, isolated_given=isolated is not None)

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
    text += _devices_note(comparison)
    return Verdict(status="divergence", text=text, first_divergence=first, culprits=culprits,
                   isolated_failures_outside_blocks=outside, isolated_given=isolated is not None,
                   first_block_is_culprit=is_culprit)


def _devices_note(comparison: Comparison) -> str:
    pair = device_pair(comparison.ref_metadata, comparison.cand_metadata)
    return f" [cross-device: {pair[0]} reference, {pair[1]} candidate]" if pair else ""


def verdict_dict(verdict: Verdict) -> dict[str, Any]:
    return {"status": verdict.status, "text": verdict.text, "exit_code": verdict.exit_code,
            "isolated_given": verdict.isolated_given, "first_block_is_culprit": verdict.first_block_is_culprit}
