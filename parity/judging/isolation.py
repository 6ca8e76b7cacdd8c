"""Whether an isolated run really isolated its blocks.

A block is to blame for its own error only if the candidate's isolated run fed it the reference's
captured inputs. The isolated run records each block's inputs (`block@argument`) as the candidate
received them; this module checks them against the reference's, value for value (a wider dtype holding
the same values is fine). A block whose inputs differ was not isolated (the candidate ran it on its
own upstream results, or changed the inputs), so the verdict names no culprit there and says why; a
block whose outputs were recorded without its inputs cannot be checked, which the verdict notes too.
Component inputs (`@z`, `@encoder_hidden_states`, ...) are not in this check: in an isolated run they
are what the candidate's pipeline stages computed from the reference's tensors, judged as such.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .compare import Comparison, TensorResult
from .tolerances import identical


@dataclass
class IsolationCheck:
    breaches: list[TensorResult] = field(default_factory=list)  # block inputs that are not the reference's
    unverified: list[str] = field(default_factory=list)  # blocks with outputs but no recorded inputs

    def breached(self, component: str, path: str) -> bool:
        return any(r.component == component and r.block.path == path for r in self.breaches)

    def breached_blocks(self) -> list[str]:
        return list(dict.fromkeys(r.block_id for r in self.breaches))

    def describe(self) -> str:
        first = self.breaches[0]
        return (f"the isolated run was not isolated at {', '.join(self.breached_blocks())}: {first.key} is not the "
                "reference's input, so no culprit is named there")


def check_isolation(isolated: Comparison) -> IsolationCheck:
    check = IsolationCheck()
    with_inputs: set[tuple[str, str, str]] = set()
    with_outputs: dict[tuple[str, str, str], str] = {}
    for result in isolated.results:
        block = result.block
        if block is None:
            continue
        where = (result.component, result.invocation, block.path)
        if result.kind == "input":
            if result.status in ("missing", "skipped"):
                continue
            with_inputs.add(where)
            if result.status == "shape_mismatch" or result.metrics is None or not identical(result.metrics):
                check.breaches.append(result)
        elif result.status not in ("missing", "skipped"):
            with_outputs.setdefault(where, result.block_id)
    check.unverified = list(dict.fromkeys(block_id for where, block_id in with_outputs.items()
                                          if where not in with_inputs))
    return check
