"""Derived tensors are judged by what they derive from, not against the reference on their own.

Some pipeline tensors are a fixed, cheap function of other captured tensors, and that function can
amplify the sources' legitimate error far beyond the derived tensor's own scale:

* the guided noise prediction `noise_pred = u + s * (t - u)` of its halves `noise_pred_uncond` (u)
  and `noise_pred_text` (t), guidance scale s (7.5 by default): the halves' accumulated error is
  multiplied by up to 2s + 1 while the difference t - u is small, so a candidate whose halves both
  pass can see its guided prediction "fail" against the reference;
* the 8-bit image `image_uint8 = round(255 * image)`: a float difference far below one level flips
  every pixel that sits on a half-level boundary.

Such a tensor passes when the candidate computed it correctly from its OWN sources (the sources are
judged by their own rows): each element within a few roundings of the function applied to them. A
wrong combination (guidance halves swapped, an 8-bit image truncated instead of rounded) fails at the
derived tensor itself. In an isolated run the stage was fed the reference's sources, so those are used.
When the sources are not in the candidate run (a port that records only the derived tensor), the
tensor is judged like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .metrics import eps, is_float
from .tolerances import Decision, Rule, _criterion, _decide

GUIDANCE_ULPS = 4.0  # u + s (t - u) rounds three times, each at most half an ULP of its operands' scale
IMAGE_SLACK = 1e-3  # 8-bit levels a rounding may be off beyond half a level (float error in 255 x)

Read = Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class Derivation:
    sources: tuple[str, ...]  # tensor names in the same invocation
    describe: str


DERIVATIONS = {
    ("pipeline", "noise_pred"): Derivation(("noise_pred_uncond", "noise_pred_text"),
                                           "the guidance combination u + s (t - u) of its own halves"),
    ("pipeline", "image_uint8"): Derivation(("image",), "round(255 x) of its own float image"),
}


def derivation_of(component: str, name: str) -> Derivation | None:
    return DERIVATIONS.get((component, name))


def judge_derived(component: str, invocation: str, name: str, cand: np.ndarray, read: Read, rule: Rule,
                  guidance: float | None) -> Decision | None:
    """The decision for a derived tensor from its sources (`read(key)` gives a source by reference
    key, or None), or None when it is not derived or a source is missing."""
    derivation = derivation_of(component, name)
    if derivation is None:
        return None
    sources = [read(f"{component}/{invocation}/{source}") for source in derivation.sources]
    if any(source is None or source.shape != cand.shape for source in sources):
        return None
    if name == "noise_pred":
        if guidance is None:
            return None
        return _guidance(cand, *sources, guidance, rule)
    return _image(cand, sources[0], rule)


def _guidance(cand: np.ndarray, uncond: np.ndarray, text: np.ndarray, scale: float, rule: Rule) -> Decision:
    dtype = rule.dtype if is_float(rule.dtype) else "float32"
    u, t = uncond.astype(np.float64), text.astype(np.float64)
    expected = u + scale * (t - u)
    scale_of_terms = np.abs(u) + abs(scale) * (np.abs(t) + np.abs(u))
    limit = GUIDANCE_ULPS * eps(dtype) * scale_of_terms + np.finfo(np.float64).tiny
    excess = np.abs(cand.astype(np.float64) - expected) / limit
    worst = float(np.nanmax(excess)) if excess.size else 0.0
    criteria = [_criterion("derived", worst, 1.0, f"max |c - (u + s (t - u))| in units of {GUIDANCE_ULPS:g} "
                                                  f"ULPs ({dtype}) of |u| + s (|t| + |u|), u and t its own halves"),
                _criterion("nonfinite", int(np.count_nonzero(~np.isfinite(excess))), 0,
                           "NaN/Inf in the prediction or its halves")]
    settings = {"dtype": dtype, "derived_from": ["noise_pred_uncond", "noise_pred_text"], "guidance_scale": scale,
                "ulps": GUIDANCE_ULPS}
    return _decide("derived", criteria, settings, "default" if rule.override is None else "override",
                   rule.override.describe() if rule.override is not None else None)


def _image(cand: np.ndarray, image: np.ndarray, rule: Rule) -> Decision:
    exact = 255.0 * np.clip(image.astype(np.float64), 0.0, 1.0)
    # a correct rounding is at most half a level from 255 x; measured is how far beyond that it goes
    beyond = float(np.abs(cand.astype(np.float64) - exact).max()) - 0.5 if cand.size else 0.0
    criteria = [_criterion("derived", max(beyond, 0.0), IMAGE_SLACK,
                           "8-bit levels beyond a rounding of its own float image (round(255 x) is at most "
                           "half a level from 255 x)")]
    settings = {"dtype": "uint8", "derived_from": ["image"], "slack": IMAGE_SLACK}
    return _decide("derived", criteria, settings, "default" if rule.override is None else "override",
                   rule.override.describe() if rule.override is not None else None)
