"""Accepted deviations: known, explained differences a port lives with ([[deviation]] in parity.toml).

    [[deviation]]
    pattern = "unet/*/time_proj"     # or regex = '...'; matched like an override's pattern
    limit = 50                       # the largest accepted ratio (error / tolerance) of a matching tensor
    reason = "float32 sin/cos in the time embedding, less accurate than torch's"
    required = true                  # (default) the pattern must match a compared tensor

A tensor a deviation matches that fails its tolerance by at most `limit` times is "accepted"; beyond that
it fails as usual. Downstream of an accepted deviation the free run inherits it, so there each tensor is
judged by its local error, from the isolated run (every block fed the reference's inputs, every stage
the reference's tensors): a free failure after the first accepted tensor is accepted when the same tensor
is within tolerance (or itself accepted) in the isolated run. In the isolated run, the modules outside
blocks run as one pass of their component, so those following an accepted tensor in the same call inherit
it there too; they are accepted as such and counted, not checked locally (a block's own error is always
checked locally). Without an isolated run nothing downstream is accepted and the verdict says why.

Nothing is accepted silently: each accepted row has the status "accepted" and a note naming the deviation
and its reason; the verdict counts them ("parity with 1 accepted deviation") and the summary lists every
deviation with its outcome. A required deviation that matches no compared tensor makes the run
incomplete (a misspelt pattern must not pass for a fixed port); one whose tensors are all within
tolerance is listed as no longer needed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .tolerances import ToleranceConfigError, compile_pattern, pattern_matches, require_reason

if TYPE_CHECKING:
    from .compare import Comparison, TensorResult

ACCEPTED = "accepted"
KEYS = ("pattern", "regex", "limit", "reason", "required")


@dataclass(frozen=True)
class Deviation:
    pattern: str
    kind: str  # "glob" | "regex", as an override's
    limit: float
    reason: str
    required: bool = True
    compiled: re.Pattern | None = field(default=None, compare=False, repr=False)

    def matches(self, result: TensorResult) -> bool:
        return pattern_matches(self.pattern, self.kind, self.compiled, result.component, result.invocation,
                               result.name)

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "kind": self.kind, "limit": self.limit, "reason": self.reason,
                "required": self.required}


def parse_deviations(raw, where: str) -> list[Deviation]:
    """The [[deviation]] tables of a config (bad ones are ToleranceConfigError)."""
    if not isinstance(raw, list):
        raise ToleranceConfigError(f"{where}: deviation must be an array of tables ([[deviation]])")
    return [_parse_one(entry, f"{where}: deviation[{index}]") for index, entry in enumerate(raw, start=1)]


def _parse_one(raw, label: str) -> Deviation:
    if not isinstance(raw, dict):
        raise ToleranceConfigError(f"{label} must be a table ([[deviation]])")
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ToleranceConfigError(f"{label}: unknown keys {sorted(unknown)}; allowed: {sorted(KEYS)}")
    kind, pattern, compiled = compile_pattern(raw, label)
    label = f"{label.rsplit(':', 1)[0]}: deviation {pattern!r}"
    reason = require_reason(raw, label)
    limit = raw.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 1 <= limit < math.inf:
        raise ToleranceConfigError(f"{label}: limit = {limit!r}; give the largest accepted ratio (error / "
                                   "tolerance, as the report shows it) of a matching tensor, a number >= 1")
    required = raw.get("required", True)
    if not isinstance(required, bool):
        raise ToleranceConfigError(f"{label}: required must be true or false")
    return Deviation(pattern, kind, float(limit), reason, required, compiled)


@dataclass
class Outcome:
    """What one deviation came to in this comparison."""

    deviation: Deviation
    status: str  # "accepted" | "exceeded" | "not_needed" (all within tolerance) | "unmatched"
    tensors: int = 0  # compared tensors it matches (free and isolated runs)
    accepted: int = 0  # of which beyond their tolerance and within the limit
    worst: TensorResult | None = None  # the matching tensor with the largest ratio

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {**self.deviation.describe(), "status": self.status, "tensors": self.tensors,
                "accepted_tensors": self.accepted, "worst": worst.key if worst is not None else None,
                "worst_ratio": worst.ratio if worst is not None else None}


@dataclass
class Deviations:
    """The outcome of a config's deviations on a free comparison and its isolated one."""

    outcomes: list[Outcome] = field(default_factory=list)
    downstream: int = 0  # free failures accepted because they are within tolerance in isolation
    unheld: int = 0  # free failures downstream that the isolated run does not hold, accepted as its whole passes
    inherited: int = 0  # isolated failures outside blocks that follow an accepted tensor in the same call
    waiting: int = 0  # free failures downstream of an accepted deviation, with no isolated run to judge them

    @property
    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "accepted"]

    def to_dict(self) -> dict[str, Any]:
        return {"deviations": [o.to_dict() for o in self.outcomes], "accepted_deviations": len(self.accepted),
                "downstream_accepted": self.downstream, "downstream_not_in_isolated_run": self.unheld,
                "inherited_outside_blocks": self.inherited,
                "downstream_not_judged": self.waiting}

    def clause(self) -> str:
        """The verdict's words about the deviations ('' without any)."""
        parts = []
        for outcome in self.outcomes:
            d = outcome.deviation
            if outcome.status == "accepted":
                parts.append(f"{d.pattern!r} accepted in {outcome.accepted} tensor(s), worst ratio "
                             f"{outcome.worst.ratio:.3g} <= limit {d.limit:g} ({d.reason})")
            elif outcome.status == "exceeded":
                parts.append(f"{d.pattern!r} EXCEEDS its limit {d.limit:g}: {outcome.worst.key} at ratio "
                             f"{outcome.worst.ratio:.3g} ({d.reason})")
            elif outcome.status == "not_needed":
                parts.append(f"{d.pattern!r} not needed: its {outcome.tensors} tensor(s) are within tolerance")
            else:
                parts.append(f"{d.pattern!r} matches no compared tensor"
                             + (" (required: check the pattern)" if d.required else " (not required)"))
        if self.downstream or self.inherited or self.unheld:
            parts.append(f"{self.downstream} downstream tensor(s) within tolerance in isolation"
                         + (f", {self.inherited} outside blocks inheriting the deviation in the isolated run "
                            "(not checked locally)" if self.inherited else "")
                         + (f", {self.unheld} the isolated run does not hold (pipeline glue; accepted because every "
                            "tensor it holds is within tolerance or accepted)" if self.unheld else ""))
        if self.waiting:
            parts.append(f"{self.waiting} downstream tensor(s) fail and cannot be judged by their local error "
                         "without an isolated run (--isolated)")
        return "; ".join(parts)


def apply_deviations(free: Comparison, isolated: Comparison | None, deviations: list[Deviation]) -> Deviations:
    """Mark the tensors the deviations account for as "accepted" (in place, counts included). A deviation
    beyond its limit in any tensor accepts nothing: it is no longer the deviation that was explained."""
    result = Deviations()
    if not deviations:
        return result
    comparisons = [c for c in (isolated, free) if c is not None]
    matched: dict[Deviation, list[tuple[Comparison, TensorResult]]] = {d: [] for d in deviations}
    for comparison in comparisons:
        for row in comparison.results:
            deviation = next((d for d in deviations if d.matches(row)), None) if row.status in ("pass", "fail") else None
            if deviation is not None:
                matched[deviation].append((comparison, row))
    for deviation, rows in matched.items():
        outcome = Outcome(deviation, "unmatched", tensors=len(rows))
        result.outcomes.append(outcome)
        if not rows:
            continue
        outcome.worst = max((row for _, row in rows), key=lambda row: row.ratio or 0.0)
        beyond = [row for _, row in rows if row.status == "fail" and not (row.ratio or 0.0) <= deviation.limit]
        for row in beyond:
            row.notes.append(f"beyond the accepted deviation {deviation.pattern!r}: ratio {row.ratio:.3g} > limit "
                             f"{deviation.limit:g}")
        if beyond:
            outcome.status = "exceeded"
            continue
        for comparison, row in rows:
            if row.status == "fail":
                _accept(comparison, row, f"accepted deviation {deviation.pattern!r} (ratio <= limit "
                                         f"{deviation.limit:g}): {deviation.reason}")
                outcome.accepted += 1
        outcome.status = ACCEPTED if outcome.accepted else "not_needed"
    if isolated is not None:
        result.inherited = _accept_inherited(isolated)
    result.downstream, result.unheld, result.waiting = _accept_downstream(free, isolated)
    return result


def _accept(comparison: Comparison, row: TensorResult, note: str) -> None:
    comparison.coverage.counts[row.status] -= 1
    comparison.coverage.counts[ACCEPTED] = comparison.coverage.counts.get(ACCEPTED, 0) + 1
    row.status = ACCEPTED
    row.notes.append(note)


def _accept_inherited(isolated: Comparison) -> int:
    """Failures outside blocks that follow an accepted tensor in the same component call: the isolated run
    computes them in one pass of the component, from the deviation."""
    first: dict[tuple[str, str], int] = {}
    for row in isolated.results:
        if row.status == ACCEPTED and row.order is not None and row.component != "pipeline":
            where = (row.component, row.invocation)
            first[where] = min(first.get(where, row.order), row.order)
    count = 0
    for row in isolated.results:
        start = first.get((row.component, row.invocation))
        if (row.status == "fail" and row.block is None and start is not None and row.order is not None
                and row.order > start):
            _accept(isolated, row, "inherits an accepted deviation earlier in the same call (outside blocks, the "
                                   "isolated run computes it from the candidate's own upstream tensors)")
            count += 1
    return count


def _accept_downstream(free: Comparison, isolated: Comparison | None) -> tuple[int, int, int]:
    """Free failures after the first accepted tensor that are within tolerance (or accepted) in isolation;
    those the isolated run does not hold (the CFG halves, the latents between steps: copies and slices of
    tensors it judges) when nothing in it diverges. Returns (accepted, accepted unheld, not judged)."""
    orders = [r.order for r in free.results if r.status == ACCEPTED and r.order is not None]
    if not orders:
        return 0, 0, 0
    start = min(orders)
    local = {r.key: r for r in isolated.results} if isolated is not None else {}
    clean = isolated is not None and not isolated.divergent()
    accepted = unheld = waiting = 0
    for row in free.results:
        if row.status != "fail" or row.order is None or row.order <= start:
            continue
        there = local.get(row.key)
        if isolated is None:
            waiting += 1
        elif there is not None and there.status in ("pass", ACCEPTED):
            _accept(free, row, "downstream of an accepted deviation; within tolerance in isolation (its local "
                               f"error{': ' + there.notes[-1] if there.status == ACCEPTED else ''})")
            accepted += 1
        elif clean and (there is None or there.status == "missing"):
            _accept(free, row, "downstream of an accepted deviation; not in the isolated run, every tensor of "
                               "which is within tolerance or accepted")
            unheld += 1
    return accepted, unheld, waiting

