"""Where the reference itself is not finite: what parity means past an overflow.

SD's VAEs overflow float16 (SDXL's VAE config says force_upcast for that reason; tiny-sd1-stress does it on
purpose, docs/stress.md). From the first overflow on, the reference's own tensors hold Inf and then NaN,
and a candidate computing the same thing overflows there too. Parity there means: the candidate is
non-finite where the reference is. Elements at the overflow threshold go either way within rounding (a
value 1e-3 below 65504 in one run is 1e-3 above in the other), so where the reference overflows, a
candidate may differ from it in `1 - quantile` (0.1%) of the elements; where the reference is finite, it
may not overflow anywhere. The verdict says when the reference is not finite, so that parity past an
overflow is never mistaken for agreement in values: those elements are not compared.
"""
from __future__ import annotations

from typing import Any

from .metrics import FloatMetrics


def nonfinite_allowance(reference_nonfinite: int, elements: int, quantile: float) -> float:
    """How many elements a candidate's NaN/Inf may differ in from the reference's: none unless the
    reference itself has NaN/Inf there, else the quantile's share of the elements."""
    return elements * (1.0 - quantile) if reference_nonfinite else 0.0


def reference_overflow(results) -> dict[str, Any] | None:
    """The reference's non-finite tensors among compared `results`: how many, and the first one (in the
    reference's execution order), or None when the reference is finite everywhere."""
    nonfinite = [r for r in results if isinstance(r.metrics, FloatMetrics)
                 and r.metrics.ref_nan + r.metrics.ref_inf > 0]
    if not nonfinite:
        return None
    first = nonfinite[0].metrics
    return {"tensors": len(nonfinite), "first": nonfinite[0].key, "first_nonfinite": first.ref_nan + first.ref_inf,
            "first_elements": first.numel, "first_dtype": first.ref_dtype}


def overflow_clause(overflow: dict[str, Any] | None) -> str:
    """The verdict's words about a non-finite reference ('' when it is finite)."""
    if overflow is None:
        return ""
    return (f"; the reference itself is not finite in {overflow['tensors']} tensor(s) from {overflow['first']} on "
            f"({overflow['first_nonfinite']} of {overflow['first_elements']} elements there, an overflow of "
            f"{overflow['first_dtype']}): there the runs are judged by where their NaN/Inf sit, and those "
            "elements are not compared")
