"""Map a foreign implementation's tensors onto the reference's (`parity compare --map names.toml|ldm`).

docs/maps.md is the user-facing description. A map is a TOML file:

    base = "ldm"                # optional: built-in map(s) consulted after this file's rules
    unmatched = "keep"          # candidate names nothing matches: "keep" them as they are, or "drop"

    [[split]]                   # one fused candidate tensor -> several, in the candidate's own names
    glob = 'unet/*/**.attn1.to_qkv'
    into = ['unet/\\1/\\2.attn1.to_q', 'unet/\\1/\\2.attn1.to_k', 'unet/\\1/\\2.attn1.to_v']
    axis = -1                   # equal parts along this axis (default -1)

    [[transform]]               # how the candidate stores tensors; every matching table applies, in order
    glob = 'unet/**'
    layout = "nhwc"             # "nhwc" | "tokens" | "reshape" (parity/judging/transforms.py)
    batch = [1, 0]              # candidate chunk i holds reference chunk batch[i] (a CFG batch [cond, uncond])
    broadcast = true            # size-1 axes stand for the reference's repeated values (batch-1 time embedding)

    [[rule]]                    # naming; the FIRST matching rule decides
    regex = '^unet/(step_\\d+)/down\\.(\\d+)$'     # or glob = '...' (naming.glob_to_regex: *, **, ?)
    to = 'unet/\\1/down_blocks.\\2'               # the reference key; \\N = the Nth group / wildcard
    also = ['unet/\\1/down_blocks.\\2[0]']        # reference keys it also stands for (aliases), used
                                                # only where no candidate tensor maps there directly
    # or: drop = true (with an optional note): candidate-only tensors nobody should compare
    # a rule may carry layout / batch / broadcast too (applied after the [[transform]] tables)

    [[no_counterpart]]          # reference tensors the candidate's naming cannot have: listed, not missing
    glob = 'vae_decoder/*/**.nonlinearity*'
    reason = "LDM calls nonlinearity() as a function"

Patterns match the whole key `component/invocation/name` (the candidate's for split, transform and
rule; the reference's for no_counterpart). Every candidate name nothing matched is reported
(`unmatched`), `unmatched = "drop"` never drops pipeline tensors (their names are fixed by the run
format), and two candidate tensors mapped (`to`) onto one reference key is an error in the map.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sd_parity.errors import BadInput
from sd_parity.runs.hdf5 import COMPONENTS, INVOCATION_RE, Entry
from sd_parity.runs.naming import glob_to_regex
from .transforms import Chain, Transform, TransformError, apply_chain, chain_shape, parse_transform, split_part, \
    split_shape

__all__ = ["NameMap", "NameMapError", "Target", "Resolution", "MappedEntry", "CandidateView", "glob_to_regex",
           "one_pattern", "split_key"]

_TOP_LEVEL = {"unmatched", "rule", "base", "split", "transform", "no_counterpart"}
_LITERAL_NAME = re.compile(r"^[^*?/]+/\*/[^*?/]+$")  # component/*/name with a literal name: indexable


class NameMapError(BadInput, ValueError):
    """A name map that cannot be read or used; the message says which rule and what to change."""


def one_pattern(raw: dict, kinds: tuple[str, str], label: str, error: type[Exception]) -> tuple[str, str]:
    """A rule's one pattern as (kind, text): exactly one of the two `kinds` keys, a non-empty string.
    Shared by name maps and tolerance overrides, whose rules are written the same way."""
    present = [k for k in kinds if k in raw]
    if len(present) != 1:
        raise error(f"{label}: give exactly one of {kinds[0]} = '...' or {kinds[1]} = '...'")
    kind = present[0]
    pattern = raw[kind]
    if not isinstance(pattern, str) or not pattern:
        raise error(f"{label}: {kind} must be a non-empty string")
    return kind, pattern


def split_key(key: str) -> tuple[str, str, str]:
    parts = key.split("/", 2)
    if len(parts) != 3:
        raise ValueError(key)
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Target:
    """What one candidate tensor stands for."""

    to: str | None  # the reference key it is; None when it only stands in (`also`) or is dropped
    also: tuple[str, ...] = ()  # reference keys it also stands for, where no tensor maps there directly
    drop: str | None = None  # why it is not compared (a drop rule's note, a built-in map's reason)
    transform: Transform | None = None
    via: str = ""  # the rule or map that decided, for notes


@dataclass
class Pattern:
    kind: str  # "regex" | "glob"
    text: str
    compiled: re.Pattern = field(repr=False)

    def match(self, key: str) -> re.Match | None:
        return self.compiled.fullmatch(key)


@dataclass
class Rule:
    index: int  # 1-based position among the rules of its map, for messages
    where: str  # the map it comes from
    pattern: Pattern
    to: str | None
    also: tuple[str, ...]
    drop: bool
    note: str | None
    transform: Transform | None

    @property
    def kind(self) -> str:
        return self.pattern.kind

    def describe(self) -> str:
        return f"{self.where} rule {self.index} ({self.pattern.kind} {self.pattern.text!r})"

    def target(self, key: str, match: re.Match) -> Target:
        if self.drop:
            return Target(None, drop=self.note or f"dropped by {self.describe()}", via=self.describe())
        to = _expand(self, match, self.to, key) if self.to is not None else None
        also = tuple(_expand(self, match, alias, key) for alias in self.also)
        return Target(to, also, transform=self.transform, via=self.describe())


@dataclass
class SplitRule:
    index: int
    where: str
    pattern: Pattern
    into: tuple[str, ...]
    axis: int

    def describe(self) -> str:
        return f"{self.where} split {self.index} ({self.pattern.kind} {self.pattern.text!r})"


@dataclass
class TransformRule:
    index: int
    where: str
    pattern: Pattern
    transform: Transform


@dataclass
class AbsentRule:
    where: str
    pattern: Pattern
    reason: str


@dataclass(frozen=True)
class MappedEntry:
    """A candidate tensor as the comparison sees it: stored under `key`, standing for one reference tensor."""

    key: str  # the stored candidate tensor
    name: str  # its name in the candidate's namespace (a split part's name differs from the stored key)
    order: int
    dtype: str
    shape: tuple[int, ...]  # after the split and the transforms: what is compared
    ref_shape: tuple[int, ...]
    stored: Entry
    part: tuple[int, int, int] | None = None  # (index, parts, axis) of a split
    chain: Chain = ()
    alias: bool = False
    via: str = ""

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.part is not None:
            index, parts, axis = self.part
            notes.append(f"part {index + 1} of {parts} along axis {axis} of candidate tensor {self.key}")
        if self.alias:
            notes.append(f"stands in via an alias of {self.name} ({self.via}): no candidate tensor maps here directly")
        applied = [t.describe() for t in self.chain if t]
        if applied:
            notes.append(f"candidate transformed before comparing: {'; '.join(applied)} (shape stored "
                         f"{list(self.stored.shape)})")
        return notes


@dataclass
class Resolution:
    """A candidate run's tensors resolved against the reference's through a name map."""

    sources: dict[str, MappedEntry]  # reference key -> the candidate tensor standing for it
    mapping: dict[str, str]  # candidate key -> the reference key its (first) direct target names
    unmatched: list[str]  # candidate names nothing matched (and, when kept, not reference names either)
    dropped: list[str]  # candidate keys not compared by a drop rule or a built-in map's reason
    targets: dict[str, set[str]]  # candidate key -> every reference key it could stand for
    absent: dict[str, str] = field(default_factory=dict)  # reference key -> why the candidate has no counterpart

    def leftovers(self, used: set[str], ref_keys: set[str]) -> tuple[list[str], list[str]]:
        """(extra, redundant) candidate keys among those not `used`: redundant ones stand for reference
        tensors that other candidate tensors already provide (a container equal to its last child)."""
        extra, redundant, dropped = [], [], set(self.dropped)
        for key, targets in self.targets.items():
            if key in used or key in dropped:
                continue
            (redundant if targets & ref_keys else extra).append(key)
        return extra, redundant


class CandidateView:
    """Reads candidate tensors as resolved: the split part, with the transforms applied."""

    def __init__(self, reader):
        self.reader = reader

    def read(self, mapped: MappedEntry) -> np.ndarray:
        array = self.reader.read(mapped.stored)
        if mapped.part is not None:
            array = split_part(array, *mapped.part)
        return apply_chain(array, mapped.chain, mapped.ref_shape)


@dataclass
class NameMap:
    rules: list[Rule] = field(default_factory=list)
    unmatched_policy: str = "keep"
    source: str | None = None
    splits: list[SplitRule] = field(default_factory=list)
    transforms: list[TransformRule] = field(default_factory=list)
    absent: list[AbsentRule] = field(default_factory=list)
    builtins: list[str] = field(default_factory=list)  # built-in maps, consulted after the rules
    model_dir: Path | None = None  # the model folder built-in maps are generated from (else the run's)
    sources: list[str] = field(default_factory=list)
    _tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = _RuleIndex(self.rules)

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: str | os.PathLike) -> "NameMap":
        """A map file, or a built-in map by name (`ldm`)."""
        from .maps import builtin_names

        if isinstance(spec, str) and spec in builtin_names():
            return cls(builtins=[spec], source=spec, sources=[spec])
        path = Path(spec)
        if not path.is_file():
            raise NameMapError(f"name map {path} does not exist; pass a TOML file of rules or a built-in map "
                               f"({', '.join(builtin_names())}) to --map")
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise NameMapError(f"name map {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load_all(cls, specs: Iterable[str | os.PathLike], model_dir: Path | None = None) -> "NameMap":
        """Several maps as one: files' tables in the order given, built-in maps after every file's rules."""
        combined = cls.combine([cls.load(spec) for spec in specs])
        combined.model_dir = model_dir
        return combined

    @classmethod
    def combine(cls, maps: list["NameMap"]) -> "NameMap":
        """One map from several: their tables in order; `unmatched = "drop"` in any of them applies."""
        if len(maps) == 1:
            return maps[0]
        builtins = list(dict.fromkeys(b for m in maps for b in m.builtins))
        policy = "drop" if any(m.unmatched_policy == "drop" for m in maps) else "keep"
        return cls(rules=[r for m in maps for r in m.rules], unmatched_policy=policy,
                   source=", ".join(m.source or "" for m in maps), splits=[s for m in maps for s in m.splits],
                   transforms=[t for m in maps for t in m.transforms], absent=[a for m in maps for a in m.absent],
                   builtins=builtins, sources=[s for m in maps for s in m.sources])

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "NameMap":
        from .maps import builtin_names

        where = f"name map {source}" if source else "name map"
        unknown = set(data) - _TOP_LEVEL
        if unknown:
            raise NameMapError(f"{where}: unknown top-level keys {sorted(unknown)}; use base, unmatched and "
                               "[[split]], [[transform]], [[rule]], [[no_counterpart]] tables")
        policy = data.get("unmatched", "keep")
        if policy not in ("keep", "drop"):
            raise NameMapError(f"{where}: unmatched = {policy!r}; use \"keep\" or \"drop\"")
        base = data.get("base", [])
        base = [base] if isinstance(base, str) else base
        if not isinstance(base, list) or any(b not in builtin_names() for b in base):
            raise NameMapError(f"{where}: base = {data.get('base')!r}; use the name of a built-in map "
                               f"({', '.join(builtin_names())}) or a list of them")
        label = source or "name map"
        return cls(rules=[_parse_rule(raw, i, label) for i, raw in enumerate(_tables(data, "rule", where), 1)],
                   unmatched_policy=policy, source=source,
                   splits=[_parse_split(raw, i, label) for i, raw in enumerate(_tables(data, "split", where), 1)],
                   transforms=[_parse_transform(raw, i, label)
                               for i, raw in enumerate(_tables(data, "transform", where), 1)],
                   absent=[_parse_absent(raw, i, label)
                           for i, raw in enumerate(_tables(data, "no_counterpart", where), 1)],
                   builtins=list(base), sources=[source] if source else [])

    # -- naming ----------------------------------------------------------------------------------------

    def map_key(self, key: str) -> tuple[str | None, Rule | None]:
        """(the reference key, or None when dropped; the rule that matched, or None). Rules only."""
        rule, match = self._index.first(key)
        if rule is None:
            return (key if self.unmatched_policy == "keep" or key.startswith("pipeline/") else None), None
        target = rule.target(key, match)
        return target.to, rule

    def apply(self, keys: Iterable[str]) -> "Resolution":
        """Names only (no shapes, no built-in maps): which reference key each candidate key maps to."""
        entries = [Entry(*split_key(key), order, "float32", (), "output") for order, key in enumerate(keys)]
        return self.resolve(entries, [], tables=[])

    def resolve(self, cand_entries: list[Entry], ref_entries: list[Entry], ref_metadata: dict | None = None,
                tables: list | None = None) -> Resolution:
        """Resolve the candidate run's tensors against the reference run's (shapes decide the transforms)."""
        tables = self._bound_tables(ref_metadata or {}) if tables is None else tables
        ref_keys = {e.key for e in ref_entries}
        direct: dict[str, tuple] = {}
        fallback: dict[str, tuple] = {}
        mapping: dict[str, str] = {}
        unmatched: list[str] = []
        dropped: list[str] = []
        targets: dict[str, set[str]] = {}
        for entry in cand_entries:
            reasons = []
            targets[entry.key] = set()
            for name, part in self._parts(entry):
                target, matched = self._target(name, tables)
                if not matched and not (target.to == name and name in ref_keys):  # a kept name that lines up
                    unmatched.append(name)
                if target.drop is not None:
                    reasons.append(target.drop)
                    continue
                chain = tuple(t.transform for t in self.transforms if t.pattern.match(name))
                chain += (target.transform,) if target.transform else ()
                source = (entry, name, part, chain, target.via)
                if target.to is not None:
                    if target.to in direct:
                        raise NameMapError(f"candidate tensors {direct[target.to][1]!r} and {name!r} both map to "
                                           f"{target.to!r}; make the rules more specific so each reference name "
                                           "gets one candidate")
                    direct[target.to] = source
                    mapping.setdefault(entry.key, target.to)
                    targets[entry.key].add(target.to)
                for alias in target.also:
                    fallback.setdefault(alias, source)
                    targets[entry.key].add(alias)
            if reasons and not targets[entry.key]:
                dropped.append(entry.key)
        sources = {}
        for ref in ref_entries:
            hit, alias = direct.get(ref.key), False
            if hit is None:
                hit, alias = fallback.get(ref.key), True
            if hit is not None:
                sources[ref.key] = _mapped_entry(hit, ref, alias)
        absent = {}
        for ref in ref_entries:
            if ref.key not in sources:
                reason = self._absent_reason(ref.key, tables)
                if reason:
                    absent[ref.key] = reason
        return Resolution(sources=sources, mapping=mapping, unmatched=unmatched, dropped=dropped, targets=targets,
                          absent=absent)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source, "sources": list(self.sources), "builtins": list(self.builtins),
            "unmatched_policy": self.unmatched_policy,
            "rules": [{"index": r.index, "map": r.where, "kind": r.kind, "pattern": r.pattern.text, "to": r.to,
                       "also": list(r.also), "drop": r.drop,
                       "transform": r.transform.describe() if r.transform else None} for r in self.rules],
            "splits": [{"map": s.where, "pattern": s.pattern.text, "into": list(s.into), "axis": s.axis}
                       for s in self.splits],
            "transforms": [{"map": t.where, "pattern": t.pattern.text, "transform": t.transform.describe()}
                           for t in self.transforms],
            "no_counterpart": [{"map": a.where, "pattern": a.pattern.text, "reason": a.reason} for a in self.absent],
        }

    # -- internals -------------------------------------------------------------------------------------

    def _parts(self, entry: Entry) -> list[tuple[str, tuple[int, int, int] | None]]:
        for split in self.splits:
            match = split.pattern.match(entry.key)
            if match is None:
                continue
            if entry.shape and split_shape(tuple(entry.shape), len(split.into), split.axis) is None:
                raise NameMapError(f"{split.describe()}: cannot cut {entry.key} of shape {list(entry.shape)} into "
                                   f"{len(split.into)} equal parts along axis {split.axis}")
            names = [_expand(split, match, into, entry.key) for into in split.into]
            return [(name, (index, len(names), split.axis)) for index, name in enumerate(names)]
        return [(entry.key, None)]

    def _target(self, name: str, tables: list) -> tuple[Target, bool]:
        rule, match = self._index.first(name)
        if rule is not None:
            return rule.target(name, match), True
        for table in tables:
            target = table.lookup(name)
            if target is not None:
                return target, True
        if name.startswith("pipeline/"):  # the run format fixes pipeline names: never unmatched, never dropped
            return Target(name, via="pipeline tensor"), True
        if self.unmatched_policy == "keep":
            return Target(name, via="unmatched: kept as it is"), False
        return Target(None, drop="matched no rule (unmatched = \"drop\")"), False

    def _absent_reason(self, ref_key: str, tables: list) -> str | None:
        for absent in self.absent:
            if absent.pattern.match(ref_key):
                return f"{absent.reason} ({absent.where})"
        for table in tables:
            reason = table.absent_reason(ref_key)
            if reason:
                return reason
        return None

    def _bound_tables(self, ref_metadata: dict) -> list:
        from .maps import build_table

        tables = []
        for name in self.builtins:
            key = (name, str(self.model_dir), ref_metadata.get("model_path"), ref_metadata.get("model"))
            if key not in self._tables:
                self._tables[key] = build_table(name, ref_metadata, self.model_dir)
            tables.append(self._tables[key])
        return tables


class _RuleIndex:
    """First-match rule lookup; rules naming one literal tensor (`component/*/name`) are found by dict,
    so a map of thousands of such rules (as `parity align` writes) stays fast."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.literal: dict[tuple[str, str], int] = {}
        self.scanned: list[int] = []
        for position, rule in enumerate(rules):
            text = rule.pattern.text
            if rule.kind == "glob" and _LITERAL_NAME.match(text):
                component, _, name = text.split("/", 2)
                self.literal.setdefault((component, name), position)
            else:
                self.scanned.append(position)

    def first(self, key: str) -> tuple[Rule | None, re.Match | None]:
        component, _, rest = key.partition("/")
        name = rest.partition("/")[2]
        limit = self.literal.get((component, name), len(self.rules))
        for position in self.scanned:
            if position > limit:
                break
            match = self.rules[position].pattern.match(key)
            if match is not None:
                return self.rules[position], match
        if limit < len(self.rules):
            match = self.rules[limit].pattern.match(key)
            if match is not None:
                return self.rules[limit], match
        return None, None


def _mapped_entry(hit: tuple, ref: Entry, alias: bool) -> MappedEntry:
    entry, name, part, chain, via = hit
    shape = tuple(entry.shape)
    if part is not None:
        shape = split_shape(shape, part[1], part[2]) or shape
    return MappedEntry(key=entry.key, name=name, order=entry.order, dtype=entry.dtype,
                       shape=chain_shape(shape, chain, tuple(ref.shape)), ref_shape=tuple(ref.shape), stored=entry,
                       part=part, chain=chain, alias=alias, via=via)


def _tables(data: dict, key: str, where: str) -> list:
    raw = data.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise NameMapError(f"{where}: `{key}` must be an array of tables ([[{key}]])")
    return raw


def _pattern(raw: dict, label: str) -> Pattern:
    kind, text = one_pattern(raw, ("regex", "glob"), label, NameMapError)
    try:
        compiled = re.compile(text if kind == "regex" else glob_to_regex(text))
    except re.error as exc:
        raise NameMapError(f"{label}: bad regular expression {text!r}: {exc}") from exc
    return Pattern(kind, text, compiled)


def _check_keys(raw: dict, allowed: set[str], label: str, hint: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise NameMapError(f"{label}: unknown keys {sorted(unknown)}; {hint}")


def _transform(raw: dict, label: str) -> Transform | None:
    try:
        return parse_transform(raw, label)
    except TransformError as exc:
        raise NameMapError(str(exc)) from exc


def _check_groups(label: str, pattern: Pattern, templates: Iterable[str]) -> None:
    for template in templates:
        groups = {int(g) for g in re.findall(r"\\(\d+)", template)} | {
            int(g) for g in re.findall(r"\\g<(\d+)>", template)}
        if groups and max(groups) > pattern.compiled.groups:
            raise NameMapError(f"{label}: {template!r} refers to group {max(groups)} but the {pattern.kind} has only "
                               f"{pattern.compiled.groups}")


def _strings(value, label: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise NameMapError(f"{label}: {key} must be a string or a list of strings")
    return tuple(value)


def _parse_rule(raw: dict, index: int, where: str) -> Rule:
    label = f"{where}, rule {index}"
    _check_keys(raw, {"regex", "glob", "to", "also", "drop", "note", "layout", "batch", "broadcast"}, label,
                "a rule has regex or glob, then to (and also) or drop = true, an optional note and optional "
                "layout / batch / broadcast")
    pattern = _pattern(raw, label)
    drop = raw.get("drop", False)
    if not isinstance(drop, bool):
        raise NameMapError(f"{label}: drop must be true or false")
    to = raw.get("to")
    also = _strings(raw.get("also"), label, "also")
    if drop == (to is not None or bool(also)):
        raise NameMapError(f"{label}: give either to = '...' (the reference name, and/or also = [...]) or drop = true")
    if to is not None and not isinstance(to, str):
        raise NameMapError(f"{label}: to must be a string")
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        raise NameMapError(f"{label}: note must be a string")
    _check_groups(label, pattern, ([to] if to else []) + list(also))
    return Rule(index, where, pattern, to, also, drop, note, _transform(raw, label))


def _parse_split(raw: dict, index: int, where: str) -> SplitRule:
    label = f"{where}, split {index}"
    _check_keys(raw, {"regex", "glob", "into", "axis", "note"}, label,
                "a split has regex or glob, into = [the part names] and an optional axis (default -1)")
    pattern = _pattern(raw, label)
    into = _strings(raw.get("into"), label, "into")
    if len(into) < 2:
        raise NameMapError(f"{label}: into must list the names of at least two parts, e.g. the q, k and v of a fused "
                           "projection")
    axis = raw.get("axis", -1)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise NameMapError(f"{label}: axis must be an integer")
    _check_groups(label, pattern, into)
    return SplitRule(index, where, pattern, into, axis)


def _parse_transform(raw: dict, index: int, where: str) -> TransformRule:
    label = f"{where}, transform {index}"
    _check_keys(raw, {"regex", "glob", "layout", "batch", "broadcast", "note"}, label,
                "a transform has regex or glob and some of layout, batch, broadcast")
    pattern = _pattern(raw, label)
    transform = _transform(raw, label)
    if transform is None:
        raise NameMapError(f"{label}: give at least one of layout, batch, broadcast")
    return TransformRule(index, where, pattern, transform)


def _parse_absent(raw: dict, index: int, where: str) -> AbsentRule:
    label = f"{where}, no_counterpart {index}"
    _check_keys(raw, {"regex", "glob", "reason"}, label, "a no_counterpart table has regex or glob and a reason")
    pattern = _pattern(raw, label)
    reason = raw.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise NameMapError(f"{label}: give a reason: why the candidate's naming has no such tensor")
    return AbsentRule(where, pattern, reason.strip())


def _expand(rule, match: re.Match, template: str, key: str) -> str:
    try:
        target = match.expand(template)
    except (re.error, IndexError) as exc:
        raise NameMapError(f"{rule.describe()}: cannot substitute into {template!r} for {key!r}: {exc}") from exc
    _check_target(target, key, rule)
    return target


def _check_target(target: str, key: str, rule) -> None:
    try:
        component, invocation, name = split_key(target)
    except ValueError:
        raise NameMapError(f"{rule.describe()} maps {key!r} to {target!r}, which is not "
                           "component/invocation/name") from None
    if component not in COMPONENTS:
        raise NameMapError(f"{rule.describe()} maps {key!r} to component {component!r}; "
                           f"use one of {', '.join(COMPONENTS)}")
    if not INVOCATION_RE.match(invocation):
        raise NameMapError(f"{rule.describe()} maps {key!r} to invocation {invocation!r}; "
                           "use main, call_N or step_NNN")
    if not name:
        raise NameMapError(f"{rule.describe()} maps {key!r} to an empty tensor name")

