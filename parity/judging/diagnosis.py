"""Why a tensor fails: the common porting mistakes, checked on the failing pair and named.

When a tensor diverges (fail or shape_mismatch), the comparison asks this module whether a known
mistake explains it: the candidate, once the mistake is undone, lands within 1% (relative L2) of the
reference and at least ten times closer than before. Checked, in order:
  - layout: channels-last (NHWC), tokens vs feature map, another shape of the same elements, axes in
    another order (H and W swapped), NHWC data written under an NCHW shape;
  - broadcast: a size-1 axis where the reference repeats equal values (a time embedding at batch 1);
  - fused: the candidate holds several tensors side by side (q, k and v of one projection);
  - batch order: halves swapped (a classifier-free-guidance batch [cond, uncond] vs [uncond, cond]),
    or items permuted;
  - a constant scale or affine map ("candidate = reference x 5.49", with known constants named);
  - a step off by one (the candidate's step k is the reference's step k-1 or k+1), a timestep off by one;
  - 8-bit images truncated instead of rounded (one level low, never high).
Each diagnosis carries a `fix`: the name-map line that undoes a naming or layout difference, or what to
change in the port. Only the first DIAGNOSE_LIMIT divergent tensors of each component are examined
(each costs a few passes over the pair); the summary says how many were.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from .transforms import KEYS as TRANSFORM_KEYS, Transform

DIAGNOSE_LIMIT = 100  # divergent tensors examined per component (and as many extra candidate tensors)
EXPLAINED_REL = 1e-2  # relative L2 distance within which an undone mistake explains the failure
IMPROVEMENT = 10.0  # and it must bring the candidate this many times closer
_STEP_RE = re.compile(r"^step_(\d+)$")
# Known constants a wrong scale is likely to come from: value -> what it is.
CONSTANTS = {0.18215: "the SD 1.x/2.x VAE scaling factor", 0.13025: "the SDXL VAE scaling factor",
             255.0: "the 8-bit range"}
_FUSED_PARTS = (2, 3, 4)


@dataclass(frozen=True)
class Diagnosis:
    kind: str  # layout, broadcast, fused, batch_order, scale, affine, step_offset, timestep_offset, uint8_truncation
    text: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "fix": self.fix}


class Diagnoser:
    """Examines divergent tensors of one comparison (reads them again; the comparison kept nothing)."""

    def __init__(self, ref, cand, ref_metadata: dict | None = None, limit: int = DIAGNOSE_LIMIT):
        self.ref, self.cand, self.limit = ref, cand, limit
        self.guided = float((ref_metadata or {}).get("guidance") or 1.0) > 1.0
        self.per_component: Counter = Counter()
        self.extras_examined = 0  # extras have their own budget: they are examined after every row

    @property
    def examined(self) -> int:
        return sum(self.per_component.values()) + self.extras_examined

    def diagnose(self, result, entry, match) -> list[Diagnosis]:
        """Diagnoses for one divergent row (entry: the reference's, match: the candidate's mapped entry)."""
        if self.per_component[entry.component] >= self.limit or match is None or not self._held(match.key):
            return []
        self.per_component[entry.component] += 1
        ref = self.ref.read(entry)
        cand = self.cand.read(match)
        found = explain(ref, cand, key=entry.key, guided=self.guided)
        if not found and ref.shape == cand.shape:
            found = self._step_offset(entry, cand, _rel(ref, cand))
        return found

    def diagnose_extras(self, results) -> None:
        """Candidate tensors with no reference name that hold missing reference tensors side by side."""
        missing: dict[tuple[str, str, str], list] = {}
        for row in results:
            if row.status == "missing":
                missing.setdefault((row.component, row.invocation, _parent(row.name)), []).append(row)
        for row in results:
            if row.status != "extra" or self.extras_examined >= self.limit:
                continue
            siblings = missing.get((row.component, row.invocation, _parent(row.name)))
            if not siblings or len(siblings) not in _FUSED_PARTS or not self._held(row.cand_key):
                continue
            self.extras_examined += 1
            diagnosis = self._fused(row, siblings)
            if diagnosis is not None:
                for target in (row, *siblings):
                    target.diagnoses.append(diagnosis)
                    target.notes.append(f"diagnosis: {diagnosis.text}")

    def _held(self, key: str) -> bool:
        """Whether the candidate's data is at hand: a live run (live.py) keeps only some tensors."""
        holds = getattr(self.cand.reader, "holds", None)
        return holds is None or holds(key)

    def _fused(self, row, siblings) -> Diagnosis | None:
        cand = self.cand.reader.read(self.cand.reader.entry(row.cand_key))
        parts = [self.ref.read(self.ref.entry(s.key)) for s in siblings]
        for axis in range(cand.ndim):
            if not all(p.ndim == cand.ndim and all(p.shape[a] == cand.shape[a] for a in range(p.ndim) if a != axis)
                       for p in parts) or sum(p.shape[axis] for p in parts) != cand.shape[axis]:
                continue
            pieces = np.split(cand, np.cumsum([p.shape[axis] for p in parts])[:-1], axis=axis)
            swapped = [Transform(batch=(1, 0)).apply(piece, piece.shape) for piece in pieces]
            if all(_close(p, piece) for p, piece in zip(parts, pieces)) or (
                    cand.ndim > 1 and cand.shape[0] % 2 == 0 and all(_close(p, q) for p, q in zip(parts, swapped))):
                names = [s.name.rsplit(".", 1)[-1] for s in siblings]
                leaf = row.cand_key.rsplit(".", 1)[-1]
                into = ", ".join(f"'{row.component}/\\1/\\2.{n}'" for n in names)
                axis_from_end = axis - cand.ndim
                return Diagnosis("fused", f"{row.cand_key} holds {', '.join(names)} side by side along axis "
                                          f"{axis_from_end} (fused, e.g. one q/k/v projection)",
                                 f"[[split]] glob = '{row.component}/*/**.{leaf}' into = [{into}] "
                                 f"axis = {axis_from_end}")
        return None

    def _step_offset(self, entry, cand: np.ndarray, before: float) -> list[Diagnosis]:
        match = _STEP_RE.match(entry.invocation)
        if not match:
            return []
        step = int(match.group(1))
        for offset in (-1, 1):
            key = f"{entry.component}/step_{step + offset:03d}/{entry.name}"
            if step + offset < 0 or key not in self.ref:
                continue
            other = self.ref.entry(key)
            if tuple(other.shape) != cand.shape:
                continue
            if _explains(self.ref.read(other), cand, before):
                where = "behind" if offset < 0 else "ahead"
                return [Diagnosis("step_offset", f"the candidate's step_{step:03d} equals the reference's "
                                                 f"step_{step + offset:03d}: one step {where} (a loop or timestep "
                                                 "index off by one?)",
                                  "check which step's tensor the port records, and its timestep schedule")]
        return []


def explain(ref: np.ndarray, cand: np.ndarray, key: str = "", guided: bool = False) -> list[Diagnosis]:
    """The known mistakes that explain why `cand` does not match `ref` (empty when none does)."""
    if ref.dtype == np.uint8 and cand.dtype == np.uint8 and ref.shape == cand.shape:
        return _uint8(ref, cand)
    ref64 = _as_float(ref)
    cand64 = _as_float(cand)
    if ref64 is None or cand64 is None:
        return []
    if ref64.shape != cand64.shape:
        return _shape_mismatch(ref64, cand64, key, guided)
    before = _rel(ref64, cand64)
    for check in (_batch_order, _same_shape_layout):
        found = check(ref64, cand64, before, key, guided)
        if found:
            return found
    return _timestep(ref64, cand64, key) or _scale(ref64, cand64, before)


def summarize(results, examined: int, limit: int = DIAGNOSE_LIMIT) -> dict[str, Any] | None:
    """summary.json's `diagnosis`: per component and kind found, how many tensors, the first, its text and
    the fix (a transform's keys come as a [[transform]] table for the component)."""
    groups: dict[tuple[str, str], list] = {}
    for row in results:
        for found in row.diagnoses:
            groups.setdefault((row.component, found.kind), []).append((row, found))
    if not groups:
        return None
    kinds = []
    for (component, kind), hits in groups.items():
        row, found = hits[0]
        fix = found.fix
        if fix and fix.split(" ", 1)[0] in TRANSFORM_KEYS:
            fix = f"[[transform]] glob = '{component}/**' {fix}"
        kinds.append({"component": component, "kind": kind, "tensors": len({id(r) for r, _ in hits}),
                      "first": row.key, "text": found.text, "fix": fix})
    divergent = sum(1 for r in results if r.status in ("fail", "shape_mismatch"))
    return {"examined": examined, "limit": limit, "divergent": divergent, "kinds": kinds}


def clause(diagnosis: dict[str, Any] | None) -> str:
    """The verdict's statement of the likely causes (empty without diagnoses)."""
    if not diagnosis:
        return ""
    causes = [f"{k['text']} ({k['tensors']} tensor{'s' if k['tensors'] != 1 else ''}, first {k['first']})"
              for k in diagnosis["kinds"]]
    return "; diagnosis: " + "; ".join(causes)


# -- checks ------------------------------------------------------------------------------------------


def _shape_mismatch(ref, cand, key, guided) -> list[Diagnosis]:
    for transform, what in _layouts(ref.shape, cand.shape):
        moved = transform.apply(cand, ref.shape) if isinstance(transform, Transform) else cand.transpose(transform)
        if moved.shape != ref.shape:
            continue
        fix = transform.describe() if isinstance(transform, Transform) else None
        if _close(ref, moved):
            return [Diagnosis("layout", what, fix or "transpose it to the reference's axis order before writing")]
        order = _batch_order(ref, moved, _rel(ref, moved), key, guided)
        if order:
            fix = f"{fix}, {order[0].fix}" if fix else order[0].fix
            return [Diagnosis("layout", what, fix), order[0]]
    broadcast = Transform(broadcast=True)
    if broadcast.shape(cand.shape, ref.shape) == ref.shape and _close(ref, broadcast.apply(cand, ref.shape)):
        return [Diagnosis("broadcast", f"the candidate's shape {list(cand.shape)} broadcasts to the reference's "
                                       f"{list(ref.shape)}, whose items along the size-1 axes are equal: it is "
                                       "broadcast-equivalent (e.g. computed once at batch 1)", "broadcast = true")]
    return _fused_in(ref, cand)


def _layouts(ref_shape, cand_shape):
    """(transform or axis permutation, description) that could turn cand_shape into ref_shape."""
    named = [(Transform(layout="nhwc"), "channels-last layout: the candidate holds (N, H, W, C), the reference "
                                        "(N, C, H, W)"),
             (Transform(layout="tokens"), "tokens vs feature map: one side holds (B, H*W, C), the other (B, C, H, W)"),
             (Transform(layout="reshape"), f"the same elements in the same order under another shape "
                                           f"({list(cand_shape)} vs {list(ref_shape)})")]
    for transform, what in named:
        if transform.shape(cand_shape, ref_shape) == tuple(ref_shape):
            yield transform, what
    if sorted(cand_shape) == sorted(ref_shape) and len(cand_shape) <= 5:
        for axes in itertools.permutations(range(len(cand_shape))):
            if axes != tuple(range(len(axes))) and tuple(cand_shape[a] for a in axes) == tuple(ref_shape):
                yield axes, f"axes in another order: the reference is the candidate transposed by {list(axes)}"


def _same_shape_layout(ref, cand, before, key, guided) -> list[Diagnosis]:
    if ref.ndim == 4:
        n, c, h, w = ref.shape
        reinterpreted = cand.reshape(n, h, w, c).transpose(0, 3, 1, 2)
        if _explains(ref, reinterpreted, before):
            return [Diagnosis("layout", "channels-last data under an NCHW shape: the candidate's buffer holds "
                                        "(N, H, W, C) but was written as (N, C, H, W)",
                              "write the shape as stored, (N, H, W, C), and map it with layout = \"nhwc\"")]
    if ref.ndim <= 4:
        for axes in itertools.permutations(range(ref.ndim)):
            if axes != tuple(range(ref.ndim)) and tuple(ref.shape[a] for a in axes) == ref.shape:
                if _explains(ref, cand.transpose(axes), before):
                    return [Diagnosis("layout", f"axes of equal length swapped: the reference is the candidate "
                                                f"transposed by {list(axes)}",
                                      "transpose it to the reference's axis order before writing")]
    return []


def _batch_order(ref, cand, before, key, guided) -> list[Diagnosis]:
    if ref.ndim == 0 or ref.shape[0] < 2 or ref.shape != cand.shape:
        return []
    n = ref.shape[0]
    if n % 2 == 0 and _explains(ref, Transform(batch=(1, 0)).apply(cand, ref.shape), before):
        cfg = guided and (key.startswith("unet/") or key.endswith("/latent_model_input"))
        text = ("batch halves swapped: the candidate's classifier-free-guidance batch is [cond, uncond], the "
                "reference's [uncond, cond]" if cfg else "batch halves swapped")
        return [Diagnosis("batch_order", text, "batch = [1, 0]")]
    if n <= 16:
        distance = np.array([[_rel(ref[j], cand[i]) for j in range(n)] for i in range(n)])
        order = tuple(int(j) for j in distance.argmin(axis=1))
        if sorted(order) == list(range(n)) and order != tuple(range(n)):
            if _explains(ref, Transform(batch=order).apply(cand, ref.shape), before):
                return [Diagnosis("batch_order", f"batch items permuted: candidate item i is reference item "
                                                 f"{list(order)}[i]", f"batch = {list(order)}")]
    return []


def _scale(ref, cand, before) -> list[Diagnosis]:
    flat_r, flat_c = ref.ravel(), cand.ravel()
    norm = float(flat_r @ flat_r)
    if norm == 0 or not math.isfinite(norm):
        return []
    scale = float(flat_r @ flat_c) / norm
    if abs(scale - 1) > 1e-6 and _explains(ref, cand / scale if scale else cand, before):
        return [Diagnosis("scale", f"candidate = reference x {scale:.4g}{_known(scale)}",
                          "find where the port multiplies or divides by this factor")]
    # least squares c = a r + b, from the centred sums (no n x 2 design matrix for large tensors)
    mean_r, mean_c = float(flat_r.mean()), float(flat_c.mean())
    spread = float((flat_r - mean_r) @ (flat_r - mean_r))
    a = float((flat_r - mean_r) @ (flat_c - mean_c)) / spread if spread else 0.0
    b = mean_c - a * mean_r
    if a and abs(b) > 1e-6 * (np.abs(flat_c).max() or 1) and _explains(ref, (cand - b) / a, before):
        hint = " (a [-1, 1] vs [0, 1] value range?)" if abs(abs(a) - 2) < 1e-3 or abs(abs(a) - 0.5) < 1e-3 else ""
        return [Diagnosis("affine", f"candidate = reference x {a:.4g} {'+' if b >= 0 else '-'} {abs(b):.4g}{hint}",
                          "find the rescaling the port applies (or misses)")]
    return []


def _timestep(ref, cand, key) -> list[Diagnosis]:
    if "timestep" not in key.rsplit("/", 1)[-1]:
        return []
    difference = cand - ref
    if difference.size and np.all(difference == difference.flat[0]) and abs(difference.flat[0]) == 1:
        return [Diagnosis("timestep_offset", f"timestep off by {difference.flat[0]:+.0f} everywhere (the scheduler's "
                                             "steps_offset?)", "check the port's timestep schedule")]
    return []


def _uint8(ref: np.ndarray, cand: np.ndarray) -> list[Diagnosis]:
    difference = cand.astype(np.int16) - ref.astype(np.int16)
    low, high = int(difference.min()), int(difference.max())
    share = float(np.mean(difference != 0))
    if (low, high) == (-1, 0) and share >= 0.01:
        return [Diagnosis("uint8_truncation", f"image truncated instead of rounded: the candidate is one level low "
                                              f"at {share:.1%} of values and never high",
                          "convert with round(x * 255) (or floor(x * 255 + 0.5)), not a plain cast")]
    if (low, high) == (0, 1) and share >= 0.01:
        return [Diagnosis("uint8_truncation", f"image rounded up instead of to nearest: the candidate is one level "
                                              f"high at {share:.1%} of values and never low",
                          "convert with round(x * 255), not ceil")]
    return []


def _fused_in(ref, cand) -> list[Diagnosis]:
    """The candidate holds the reference tensor as one of k equal parts along an axis."""
    if ref.ndim != cand.ndim:
        return []
    for axis in range(ref.ndim):
        others_equal = all(ref.shape[a] == cand.shape[a] for a in range(ref.ndim) if a != axis)
        parts = cand.shape[axis] // ref.shape[axis] if ref.shape[axis] else 0
        if not others_equal or parts not in _FUSED_PARTS or cand.shape[axis] != parts * ref.shape[axis]:
            continue
        for index, piece in enumerate(np.split(cand, parts, axis=axis)):
            if _close(ref, piece):
                return [Diagnosis("fused", f"the candidate holds {parts} tensors side by side along axis {axis}; "
                                           f"part {index + 1} is this one (fused, e.g. one q/k/v projection)",
                                  f"[[split]] the candidate tensor into {parts} parts with axis = {axis}")]
    return []


# -- helpers -----------------------------------------------------------------------------------------


def _as_float(array: np.ndarray) -> np.ndarray | None:
    if array.dtype == np.bool_:
        return None
    try:
        return np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _rel(ref, cand) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape:
        return math.inf
    scale = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(cand - ref))
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale else (0.0 if diff == 0 else math.inf)


def _close(ref, cand) -> bool:
    return _rel(ref, cand) <= EXPLAINED_REL


def _explains(ref, moved, before: float) -> bool:
    after = _rel(ref, moved)
    return after <= EXPLAINED_REL and after * IMPROVEMENT <= before


def _known(scale: float) -> str:
    for value, what in CONSTANTS.items():
        for form, number in ((f"{value:g}", value), (f"1/{value:g}", 1 / value), (f"{value:g}^2", value ** 2),
                             (f"1/{value:g}^2", value ** -2)):
            if abs(scale / number - 1) < 2e-3:
                return f" (= {form}: {what}, applied once too often or missing?)"
    return ""


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""
