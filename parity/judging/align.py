"""Propose a name map for a candidate run with unknown names (`parity align REF CAND --write-map map.toml`).

As Refiners' model converter pairs two models' layers by execution order and shape, this pairs the
candidate's tensors with the reference's, one component at a time, on the first invocation both runs
have (names do not change between steps), then writes rules that hold for every invocation:
  1. each tensor is summarised by its element count, shape and a value sketch (33 quantiles of its
     values: the same for a tensor stored channels-last or with its batch halves swapped);
  2. an order-preserving alignment (dynamic programming) pairs tensors of equal element count,
     scoring value agreement above shape agreement, so ties of shape are broken by value;
  3. reference tensors left over (block inputs, diffusers' block tuples) are matched by value to the
     candidate tensor that holds the same numbers (an unused one becomes their direct source, a used one
     an alias); left-over candidate tensors equal to an already matched reference tensor become aliases
     (containers equal to their last child); a left-over candidate tensor whose equal parts along an
     axis hold left-over reference tensors becomes a [[split]];
  4. each pair's transform (channels-last, tokens, another shape, batch halves swapped) is chosen by
     reading both tensors and keeping the one that brings them closest.
What it could not place is listed, in the report and at the end of the map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sd_parity.runs.hdf5 import Entry, RunReader
from sd_parity.runs.open import open_run
from sd_parity.runs.naming import is_block_level
from .transforms import Transform

QUANTILES = np.linspace(0.0, 1.0, 33)
VALUE_MATCH = 1e-3  # sketch distance under which two tensors hold the same numbers
VALUE_SCALE = 0.1  # sketch distance beyond which value agreement adds nothing to a pair's score
# What a pair's candidate may need, simplest first: a channels-last port's feature maps may also be
# another shape of the reference's (nhwc, then tokens or reshape).
_TRANSFORMS = [Transform()] + [Transform(layout=layout) for layout in
                               ("nhwc", "tokens", "reshape", ("nhwc", "tokens"), ("nhwc", "reshape"))]


@dataclass
class Pair:
    ref: str  # reference name (no component/invocation)
    cand: str  # candidate name
    alias: bool = False  # the candidate tensor stands in: it is mapped to another name first
    transform: Transform = field(default_factory=Transform)
    split: tuple[int, int, int] | None = None  # (index, parts, axis) of a fused candidate tensor


@dataclass
class ComponentAlignment:
    component: str
    invocation: str
    ref_names: list[str]
    cand_names: list[str]
    pairs: list[Pair] = field(default_factory=list)

    @property
    def placed(self) -> set[str]:
        return {p.ref for p in self.pairs}

    @property
    def unplaced_ref(self) -> list[str]:
        placed = self.placed
        return [n for n in self.ref_names if n not in placed]

    @property
    def unplaced_cand(self) -> list[str]:
        used = {p.cand for p in self.pairs}
        return [n for n in self.cand_names if n not in used]

    def block_level(self) -> tuple[int, int]:
        """(placed, total) reference names at block level (naming.is_block_level)."""
        names = [n for n in self.ref_names if is_block_level(self.component, n)]
        placed = self.placed
        return sum(1 for n in names if n in placed), len(names)

    def to_dict(self) -> dict[str, Any]:
        placed, total = self.block_level()
        return {"component": self.component, "invocation": self.invocation, "ref_tensors": len(self.ref_names),
                "cand_tensors": len(self.cand_names), "placed": len(self.placed), "block_level_placed": placed,
                "block_level": total, "unplaced_reference": self.unplaced_ref,
                "unplaced_candidate": self.unplaced_cand}


@dataclass
class Alignment:
    components: list[ComponentAlignment]
    missing_components: list[str]  # in the reference, not in the candidate

    def to_dict(self) -> dict[str, Any]:
        return {"components": [c.to_dict() for c in self.components], "missing_components": self.missing_components}


def align_runs(ref_path, cand_path) -> Alignment:
    """Pair the candidate's tensors with the reference's (see the module docstring)."""
    with open_run(ref_path) as ref, open_run(cand_path) as cand:
        ref_first = _first_invocations(ref.entries())
        cand_first = _first_invocations(cand.entries())
        components, missing = [], []
        for component, (invocation, ref_entries) in ref_first.items():
            cand_entries = cand_first.get(component, (None, []))[1]
            same = [e for e in cand.entries() if e.component == component and e.invocation == invocation]
            cand_entries = same or cand_entries
            if not cand_entries:
                missing.append(component)
                continue
            components.append(_align_component(ref, cand, component, invocation, ref_entries, cand_entries))
        return Alignment(components, missing)


def write_map(alignment: Alignment, source: str) -> str:
    """The proposed map as TOML text: splits, then one rule per renamed or transformed tensor."""
    lines = [f"# Proposed by parity align from {source}: names paired by execution order, shape and values.",
             "# Check it: parity compare REF CAND --map THIS_FILE. What could not be placed is listed at the end.",
             'unmatched = "keep"', ""]
    for part in alignment.components:
        for pair in part.pairs:
            if pair.split is not None and pair.split[0] == 0:
                parts = [p for p in part.pairs if p.cand == pair.cand and p.split is not None]
                parts.sort(key=lambda p: p.split[0])
                target = part.component + "/\\1/"
                lines += ["[[split]]", "glob = " + _toml(f"{part.component}/*/{pair.cand}"),
                          "into = " + _toml([target + p.ref for p in parts]), f"axis = {pair.split[2]}", ""]
    for part in alignment.components:
        direct = {p.cand: p for p in part.pairs if not p.alias and p.split is None}
        aliases: dict[str, list[str]] = {}
        for pair in part.pairs:
            if pair.alias:
                aliases.setdefault(pair.cand, []).append(pair.ref)
        for cand in part.cand_names:
            pair = direct.get(cand)
            also = aliases.get(cand, [])
            split_parts = [p for p in part.pairs if p.cand == cand and p.split is not None]
            if split_parts:
                for p in split_parts:  # a split's parts are named after their reference tensors
                    lines += _rule(part.component, p.ref, p.ref, [], p.transform)
                continue
            if pair is None and not also:
                continue
            if pair is not None and pair.ref == cand and not also and not pair.transform:
                continue  # same name, same layout: nothing to say
            lines += _rule(part.component, cand, pair.ref if pair else None, also,
                           pair.transform if pair else Transform())
    for part in alignment.components:
        if part.unplaced_ref or part.unplaced_cand:
            lines.append(f"# {part.component} ({part.invocation}): not placed")
            lines += [f"#   reference {name}" for name in part.unplaced_ref]
            lines += [f"#   candidate {name}" for name in part.unplaced_cand]
    for component in alignment.missing_components:
        lines.append(f"# {component}: the candidate has no tensors of this component")
    return "\n".join(lines) + "\n"


# -- the alignment -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Tensor:
    entry: Entry
    sketch: np.ndarray

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def numel(self) -> int:
        return math.prod(self.entry.shape)


def _first_invocations(entries: list[Entry]) -> dict[str, tuple[str, list[Entry]]]:
    first: dict[str, str] = {}
    for entry in entries:
        if entry.component != "pipeline":
            first.setdefault(entry.component, entry.invocation)
    return {c: (inv, [e for e in entries if e.component == c and e.invocation == inv]) for c, inv in first.items()}


def _align_component(ref: RunReader, cand: RunReader, component: str, invocation: str,
                     ref_entries: list[Entry], cand_entries: list[Entry]) -> ComponentAlignment:
    refs = [_Tensor(e, sketch(ref.read(e))) for e in ref_entries]
    cands = [_Tensor(e, sketch(cand.read(e))) for e in cand_entries]
    result = ComponentAlignment(component, invocation, [t.name for t in refs], [t.name for t in cands])
    distance = _distances(refs, cands)
    matched = _monotone_pairs(refs, cands, distance)
    used = set(matched.values())
    anchor = _anchors(len(refs), matched)
    for i, r in enumerate(refs):
        if i in matched:
            result.pairs.append(Pair(r.name, cands[matched[i]].name))
            continue
        equal = [j for j in range(len(cands)) if distance[i, j] <= VALUE_MATCH]
        if not equal:
            continue
        fresh = [j for j in equal if j not in used]
        j = min(fresh or equal, key=lambda j: (distance[i, j] > VALUE_MATCH / 10, _order_gap(j, anchor[i])))
        result.pairs.append(Pair(r.name, cands[j].name, alias=j in used))
        used.add(j)
    placed_refs = {p.ref for p in result.pairs}
    for j, c in enumerate(cands):
        if j in used:
            continue
        equal = [i for i in range(len(refs)) if distance[i, j] <= VALUE_MATCH and refs[i].name in placed_refs]
        if equal:
            result.pairs.append(Pair(refs[equal[0]].name, c.name, alias=True))
            used.add(j)
    _find_splits(cand, refs, cands, used, result)
    _choose_transforms(ref, cand, refs, cands, result)
    return result


def sketch(array: np.ndarray) -> np.ndarray:
    """33 quantiles of a tensor's finite values: blind to layout and batch order, sharp on values."""
    values = np.asarray(array, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    return np.quantile(finite, QUANTILES) if finite.size else np.zeros(len(QUANTILES))


def _distances(refs: list[_Tensor], cands: list[_Tensor]) -> np.ndarray:
    """Sketch distance per (reference, candidate) pair of equal element count; inf otherwise."""
    distance = np.full((len(refs), len(cands)), np.inf)
    if not refs or not cands:
        return distance
    ref_sketch = np.stack([t.sketch for t in refs])
    cand_sketch = np.stack([t.sketch for t in cands])
    ref_numel = np.array([t.numel for t in refs])
    cand_numel = np.array([t.numel for t in cands])
    for numel in set(ref_numel) & set(cand_numel):
        rows, cols = np.flatnonzero(ref_numel == numel), np.flatnonzero(cand_numel == numel)
        a, b = ref_sketch[rows][:, None, :], cand_sketch[cols][None, :, :]
        scale = np.maximum(np.maximum(np.linalg.norm(a, axis=2), np.linalg.norm(b, axis=2)), 1e-30)
        distance[np.ix_(rows, cols)] = np.linalg.norm(a - b, axis=2) / scale
    return distance


def _monotone_pairs(refs: list[_Tensor], cands: list[_Tensor], distance: np.ndarray) -> dict[int, int]:
    """The order-preserving pairing of maximal score (reference index -> candidate index)."""
    n, m = distance.shape
    if not n or not m:
        return {}
    same_dims = np.array([[sorted(r.entry.shape) == sorted(c.entry.shape) for c in cands] for r in refs])
    equal = distance <= VALUE_MATCH
    value = np.where(equal, 2.0, np.clip(1.0 - distance / VALUE_SCALE, 0.0, 1.0))
    score = np.where(np.isfinite(distance), 1.0 + value + 0.5 * same_dims, -np.inf)
    # A tensor whose numbers appear on the other side pairs only with those: by shape alone it could slide
    # along a run of equal tensors (a container and its last child) onto a stranger. Tensors without an
    # equal (after a real divergence) pair by order and shape alone.
    has_equal = equal.any(axis=1)[:, None] | equal.any(axis=0)[None, :]
    score[has_equal & ~equal] = -np.inf
    best = np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        through = np.maximum(best[i - 1, 1:], best[i - 1, :-1] + score[i - 1])
        best[i, 1:] = np.maximum.accumulate(np.maximum(through, 0.0))
    pairs, i, j = {}, n, m
    while i > 0 and j > 0:
        if np.isfinite(score[i - 1, j - 1]) and best[i, j] == best[i - 1, j - 1] + score[i - 1, j - 1]:
            pairs[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif best[i, j] == best[i - 1, j]:
            i -= 1
        else:
            j -= 1
    return pairs


def _anchors(n: int, matched: dict[int, int]) -> list[int]:
    """For each reference index, the candidate index paired with the nearest paired reference before it."""
    anchors, last = [], 0
    for i in range(n):
        last = matched.get(i, last)
        anchors.append(last)
    return anchors


def _order_gap(j: int, anchor: int) -> tuple[int, int]:
    return (0, anchor - j) if j <= anchor else (1, j - anchor)


def _find_splits(cand: RunReader, refs: list[_Tensor], cands: list[_Tensor], used: set[int],
                 result: ComponentAlignment) -> None:
    """Left-over candidate tensors whose equal parts along an axis hold left-over reference tensors."""
    placed = result.placed
    left = [r for r in refs if r.name not in placed]
    for j, c in enumerate(cands):
        if j in used or not left:
            continue
        array = None
        for parts in (3, 2, 4):
            for axis in range(-1, -len(c.entry.shape) - 1, -1):
                if c.entry.shape[axis] % parts:
                    continue
                if array is None:
                    array = cand.read(c.entry)
                pieces = [sketch(p) for p in np.split(array, parts, axis=axis)]
                found = []
                for piece in pieces:
                    hit = next((r for r in left if all(r is not f for f in found) and r.numel * parts == c.numel
                                and _sketch_distance(r.sketch, piece) <= VALUE_MATCH), None)
                    if hit is None:
                        break
                    found.append(hit)
                if len(found) == parts:
                    for index, r in enumerate(found):
                        result.pairs.append(Pair(r.name, c.name, split=(index, parts, axis)))
                        left.remove(r)
                    used.add(j)
                    break
            if j in used:
                break


def _choose_transforms(ref: RunReader, cand: RunReader, refs: list[_Tensor], cands: list[_Tensor],
                       result: ComponentAlignment) -> None:
    """For each pair, the transform (if any) that brings the candidate closest to the reference."""
    ref_by_name = {t.name: t.entry for t in refs}
    cand_by_name = {t.name: t.entry for t in cands}
    for pair in result.pairs:
        ref_entry, cand_entry = ref_by_name[pair.ref], cand_by_name[pair.cand]
        shape = tuple(cand_entry.shape)
        if pair.split is not None:
            shape = shape[:pair.split[2] % len(shape)] + (shape[pair.split[2]] // pair.split[1],) \
                + shape[pair.split[2] % len(shape) + 1:]
        batch_matters = len(ref_entry.shape) > 0 and ref_entry.shape[0] >= 2 and ref_entry.shape[0] % 2 == 0
        fitting = [t for t in _TRANSFORMS if t.shape(shape, ref_entry.shape) == tuple(ref_entry.shape)]
        if not fitting or (fitting == [Transform()] and not batch_matters):
            continue
        reference = np.asarray(ref.read(ref_entry), dtype=np.float64)
        array = np.asarray(cand.read(cand_entry), dtype=np.float64)
        if pair.split is not None:
            array = np.split(array, pair.split[1], axis=pair.split[2])[pair.split[0]]
        options = [t for layout in fitting for t in
                   ((layout, Transform(layout=layout.layout, batch=(1, 0))) if batch_matters else (layout,))]
        errors = [_relative(reference, t.apply(array, reference.shape)) for t in options]
        best = int(np.argmin(errors))
        # with equal shapes, undo nothing unless that brings the candidate at least twice as close
        same_shape = not fitting[0]
        pair.transform = options[0] if same_shape and errors[best] * 2 > errors[0] else options[best]


def _relative(reference: np.ndarray, candidate: np.ndarray) -> float:
    if candidate.shape != reference.shape:
        return math.inf
    scale = float(np.linalg.norm(reference)) or 1.0
    return float(np.linalg.norm(candidate - reference)) / scale


def _sketch_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30))


def _rule(component: str, cand: str, to: str | None, also: list[str], transform: Transform) -> list[str]:
    target = component + "/\\1/"
    lines = ["[[rule]]", "glob = " + _toml(f"{component}/*/{cand}")]
    if to is not None:
        lines.append("to = " + _toml(target + to))
    if also:
        lines.append("also = " + _toml([target + a for a in also]))
    for key, value in transform.toml().items():
        lines.append(f"{key} = {_toml(value)}")
    return lines + [""]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # a literal string: backslashes stay as written
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
