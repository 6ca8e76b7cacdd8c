"""Derived tensors are judged by what they derive from, not against the reference on their own.

Some pipeline tensors are a fixed, cheap function of other captured tensors, and that function can
amplify the sources' legitimate error, or hide their precision behind another dtype:

* the guided noise prediction `noise_pred = u + s * (t - u)` of its halves `noise_pred_uncond` (u)
  and `noise_pred_text` (t), guidance scale s (7.5 by default): the halves' accumulated error is
  multiplied by up to 2s + 1 while the difference t - u is small, so a candidate whose halves both
  pass can see its guided prediction "fail" against the reference;
* the float image `image = clamp(x / 2 + 0.5, 0, 1)` (NHWC, float32) of the VAE decoder's output x:
  float32 whatever the run's dtype, while its error is that of a half-precision x in an fp16 run;
* the 8-bit image `image_uint8 = round(255 * image)`: a float difference far below one level flips
  every pixel that sits on a half-level boundary.

Such a tensor passes when the candidate computed it correctly from its OWN sources (the sources are
judged by their own rows): each element within a few roundings of the function applied to them. A
wrong combination (guidance halves swapped, an image scaled twice, an 8-bit image truncated instead
of rounded) fails at the derived tensor itself. In an isolated run the stage was fed the reference's
sources, so those are used. When a source is not in the candidate run (a port that records only the
derived tensor), the tensor is judged like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .metrics import dtype_name, eps, is_float
from .tolerances import Decision, Rule, criterion, decide

ROUNDING_ULPS = 4.0  # each function below rounds at most three times, each by half an ULP of its operands' scale
IMAGE_SLACK = 1e-3  # 8-bit levels a rounding may be off beyond half a level (float error in 255 x)

Read = Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class Derivation:
    sources: tuple[str, ...]  # keys, "{invocation}" standing for the derived tensor's own invocation
    judge: Callable[..., Decision]


def _guidance(cand, uncond, text, *, scale: float, rule: Rule) -> Decision:
    u, t = uncond.astype(np.float64), text.astype(np.float64)
    terms = np.abs(u) + abs(scale) * (np.abs(t) + np.abs(u))
    return _roundings(cand, u + scale * (t - u), terms, dtype_name(uncond), rule,
                      "u + s (t - u) of its own halves u, t", {"guidance_scale": scale})


def _image(cand, decoded, *, scale: float, rule: Rule) -> Decision:
    x = np.moveaxis(decoded.astype(np.float64), 1, -1)  # NCHW -> NHWC
    return _roundings(cand, np.clip(x / 2 + 0.5, 0.0, 1.0), np.abs(x) / 2 + 0.5, dtype_name(decoded), rule,
                      "clamp(x / 2 + 0.5, 0, 1) of its own decoder output x", {})


def _image_uint8(cand, image, *, scale: float, rule: Rule) -> Decision:
    exact = 255.0 * np.clip(image.astype(np.float64), 0.0, 1.0)
    # a correct rounding is at most half a level from 255 x; measured is how far beyond that it goes
    beyond = float(np.abs(cand.astype(np.float64) - exact).max()) - 0.5 if cand.size else 0.0
    criteria = [criterion("derived", max(beyond, 0.0), IMAGE_SLACK,
                           "8-bit levels beyond a rounding of its own float image (round(255 x) is at most "
                           "half a level from 255 x)")]
    return _decision(criteria, {"dtype": "uint8", "derived_from": "round(255 x) of its own float image x",
                                "slack": IMAGE_SLACK}, rule)


DERIVATIONS: dict[tuple[str, str], Derivation] = {
    ("pipeline", "noise_pred"): Derivation(("pipeline/{invocation}/noise_pred_uncond",
                                            "pipeline/{invocation}/noise_pred_text"), _guidance),
    ("pipeline", "image"): Derivation(("vae_decoder/call_0/0",), _image),
    ("pipeline", "image_uint8"): Derivation(("pipeline/main/image",), _image_uint8),
}


def judge_derived(component: str, invocation: str, name: str, cand: np.ndarray, read: Read, rule: Rule,
                  guidance: float | None) -> Decision | None:
    """The decision for a derived tensor from its sources (`read(key)` gives a source by reference
    key, or None), or None when it is not derived or a source is missing."""
    derivation = DERIVATIONS.get((component, name))
    if derivation is None or (name == "noise_pred" and guidance is None):
        return None
    sources = [read(key.format(invocation=invocation)) for key in derivation.sources]
    if any(source is None or source.size != cand.size for source in sources):
        return None
    return derivation.judge(cand, *sources, scale=guidance, rule=rule)


def _roundings(cand: np.ndarray, expected: np.ndarray, terms: np.ndarray, source_dtype: str, rule: Rule,
               formula: str, settings: dict) -> Decision:
    """Each element within ROUNDING_ULPS ULPs (of the sources' dtype) of the terms it is computed from."""
    dtype = source_dtype if is_float(source_dtype) else "float32"
    limit = ROUNDING_ULPS * eps(dtype) * terms + np.finfo(np.float64).tiny
    excess = np.abs(cand.astype(np.float64).reshape(expected.shape) - expected) / limit
    worst = float(np.nanmax(excess)) if excess.size else 0.0
    criteria = [criterion("derived", worst, 1.0, f"max |c - {formula}| in units of {ROUNDING_ULPS:g} {dtype} "
                                                  "ULPs of the terms it is computed from"),
                criterion("nonfinite", int(np.count_nonzero(~np.isfinite(excess))), 0,
                           "NaN/Inf in the tensor or its sources")]
    return _decision(criteria, {"dtype": dtype, "derived_from": formula, "ulps": ROUNDING_ULPS, **settings}, rule)


def _decision(criteria: list[dict], settings: dict, rule: Rule) -> Decision:
    return decide("derived", criteria, settings, "default" if rule.override is None else "override",
                   rule.override.describe() if rule.override is not None else None)
