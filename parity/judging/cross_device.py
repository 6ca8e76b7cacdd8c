"""A reference and a candidate computed on different kinds of device (a CUDA reference, a CPU candidate).

Their tensors differ by more than two runs on one device do, for valid reasons (docs/tolerances.md,
"Cross-device pairs"): other kernels (cuDNN vs oneDNN convolutions, cuBLAS vs MKL GEMMs, fused
attention) sum in another order and split reductions differently, so every op's result moves by a few
ULPs and a deep network carries that forward. TF32 and reduced-precision half reductions are turned off
in our runs (sd_parity.devices), so the dtype still means what it says.

What the comparison does about it, decided by the devices the two run files record:
- calibrated mode (an fp64 oracle) needs nothing: the threshold is k times the reference's own error
  against the oracle, and another device's rounding is an error of the same size;
- default mode widens rtol and atol by CROSS_DEVICE_SCALE for the candidate's dtype, and the verdict
  and warnings say that it did.
"""
from __future__ import annotations

from dataclasses import replace

from .tolerances import Tolerances

# How much wider default-mode rtol/atol are for a cross-device pair, per judged dtype. fp32: the normwise
# default (rtol 1e-4) was set to hold valid reorderings deep in a network; the nearest thing a CPU-only
# machine has to another device, our NumPy backend (other kernels, other summation order, same fp32)
# against the torch reference, tiny-sd1, 2 DDIM steps, reaches 0.17 of it (docs/tolerances.md), so x3
# leaves room for GPU kernels that reorder more while a 1e-3 relative error still fails. Half precision:
# rounding to 2^-11 / 2^-8 after fp32 accumulation hides most reordering (x3). Neither is measured on a
# GPU yet. fp64: reordering stays near 1e-15, far inside its rtol.
CROSS_DEVICE_SCALE = {"float32": 3.0, "float16": 3.0, "bfloat16": 3.0, "float64": 1.0}


def device_of(metadata: dict) -> str:
    """The kind of device a run file says it computed on (cpu when it does not say)."""
    return str(metadata.get("device") or "cpu").split(":")[0]


def device_pair(ref_metadata: dict, cand_metadata: dict) -> tuple[str, str] | None:
    """(reference device, candidate device) when they are different kinds of device, else None."""
    pair = device_of(ref_metadata), device_of(cand_metadata)
    return pair if pair[0] != pair[1] else None


def widened(tolerances: Tolerances) -> Tolerances:
    """The same settings with each dtype's default rtol/atol scaled for a cross-device pair."""
    dtypes = {dtype: (rtol * CROSS_DEVICE_SCALE.get(dtype, 1.0), atol * CROSS_DEVICE_SCALE.get(dtype, 1.0))
              for dtype, (rtol, atol) in tolerances.dtypes.items()}
    return replace(tolerances, dtypes=dtypes)


def describe(pair: tuple[str, str], calibrated: bool) -> str:
    how = ("thresholds calibrated on the fp64 oracle, unchanged" if calibrated else
           "default rtol/atol widened x" + "/".join(f"{CROSS_DEVICE_SCALE[d]:g}" for d in ("float32", "float16"))
           + " (fp32/half) for another device's summation order")
    return f"cross-device pair: reference on {pair[0]}, candidate on {pair[1]}; {how}"


__all__ = ["CROSS_DEVICE_SCALE", "describe", "device_of", "device_pair", "widened"]
