"""Map a foreign implementation's tensor names onto the reference's (`parity compare --map names.toml`).

A map is a TOML file of ordered rules; each candidate tensor key `component/invocation/name` is
matched against the rules in file order and the FIRST matching rule decides:

    unmatched = "keep"          # keys no rule matches: "keep" them as they are (default) or "drop"

    [[rule]]                    # regular expression (Python `re`, must match the whole key)
    regex = '^unet/(step_\\d+)/down\\.(\\d+)\\.res\\.(\\d+)$'
    to = 'unet/\\1/down_blocks.\\2.resnets.\\3'

    [[rule]]                    # glob: `*` = any run of characters except '/', `**` = any run,
    glob = 'text_encoder/main/layers.*.mlp'     # `?` = one character except '/'; the rest is literal
    to = 'text_encoder/main/encoder.layers.\\1.mlp'   # \\N = the Nth wildcard

    [[rule]]
    glob = 'unet/*/debug_*'
    drop = true                 # candidate-only tensors nobody should compare

Every name no rule matched is reported (`unmatched`), so a map never hides a tensor silently.
Two candidate keys mapped to the same reference key, or a rule producing something that is not a
`component/invocation/name` key, is an error in the map.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from sd_parity.errors import BadInput
from sd_parity.runs.hdf5 import COMPONENTS, INVOCATION_RE


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


def glob_to_regex(pattern: str) -> str:
    """This project's glob dialect: `**` any run, `*` any run without '/', `?` one non-'/' character.

    Everything else is literal, including `[ ]`, which tensor names use for flattened outputs.
    Each wildcard becomes a capture group, numbered left to right.
    """
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            out.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append("([^/])")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def split_key(key: str) -> tuple[str, str, str]:
    parts = key.split("/", 2)
    if len(parts) != 3:
        raise ValueError(key)
    return parts[0], parts[1], parts[2]


@dataclass
class Rule:
    index: int  # 1-based position in the file, for messages
    kind: str  # "regex" | "glob"
    pattern: str
    to: str | None
    drop: bool
    compiled: re.Pattern = field(repr=False)

    def describe(self) -> str:
        return f"rule {self.index} ({self.kind} {self.pattern!r})"


@dataclass
class MappedNames:
    """The result of mapping a candidate's keys: cand key -> reference key, plus what was not mapped."""

    mapping: dict[str, str]
    unmatched: list[str]
    dropped: list[str]


@dataclass
class NameMap:
    rules: list[Rule]
    unmatched_policy: str = "keep"
    source: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NameMap":
        path = Path(path)
        if not path.is_file():
            raise NameMapError(f"name map {path} does not exist; pass the TOML file of rules to --map")
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise NameMapError(f"name map {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "NameMap":
        where = f"name map {source}" if source else "name map"
        unknown = set(data) - {"unmatched", "rule"}
        if unknown:
            raise NameMapError(f"{where}: unknown top-level keys {sorted(unknown)}; "
                               "use `unmatched = \"keep\"|\"drop\"` and [[rule]] tables")
        policy = data.get("unmatched", "keep")
        if policy not in ("keep", "drop"):
            raise NameMapError(f"{where}: unmatched = {policy!r}; use \"keep\" or \"drop\"")
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise NameMapError(f"{where}: `rule` must be an array of tables ([[rule]])")
        rules = []
        for index, raw in enumerate(raw_rules, start=1):
            rules.append(_parse_rule(raw, index, where))
        return cls(rules=rules, unmatched_policy=policy, source=source)

    def map_key(self, key: str) -> tuple[str | None, Rule | None]:
        """(reference key or None when dropped, the rule that matched or None)."""
        for rule in self.rules:
            match = rule.compiled.fullmatch(key)
            if match is None:
                continue
            if rule.drop:
                return None, rule
            try:
                target = match.expand(rule.to)
            except (re.error, IndexError) as exc:
                raise NameMapError(f"{rule.describe()}: cannot substitute into {rule.to!r} for {key!r}: "
                                   f"{exc}") from exc
            _check_target(target, key, rule)
            return target, rule
        return (key if self.unmatched_policy == "keep" else None), None

    def apply(self, keys: Iterable[str]) -> MappedNames:
        mapping: dict[str, str] = {}
        claimed: dict[str, str] = {}
        unmatched: list[str] = []
        dropped: list[str] = []
        for key in keys:
            target, rule = self.map_key(key)
            if rule is None:
                unmatched.append(key)
            if target is None:
                dropped.append(key)
                continue
            if target in claimed:
                raise NameMapError(f"candidate tensors {claimed[target]!r} and {key!r} both map to {target!r}; "
                                   "make the rules more specific so each reference name gets one candidate")
            claimed[target] = key
            mapping[key] = target
        return MappedNames(mapping=mapping, unmatched=unmatched, dropped=dropped)

    def describe(self) -> dict:
        return {
            "source": self.source, "unmatched_policy": self.unmatched_policy,
            "rules": [{"index": r.index, "kind": r.kind, "pattern": r.pattern, "to": r.to, "drop": r.drop}
                      for r in self.rules],
        }


def identity_map(keys: Iterable[str]) -> MappedNames:
    keys = list(keys)
    return MappedNames(mapping={k: k for k in keys}, unmatched=[], dropped=[])


def _parse_rule(raw, index: int, where: str) -> Rule:
    label = f"{where}, rule {index}"
    if not isinstance(raw, dict):
        raise NameMapError(f"{label}: each [[rule]] must be a table")
    unknown = set(raw) - {"regex", "glob", "to", "drop", "note"}
    if unknown:
        raise NameMapError(f"{label}: unknown keys {sorted(unknown)}; a rule has regex or glob, then to or "
                           "drop = true (and an optional note)")
    kind, pattern = one_pattern(raw, ("regex", "glob"), label, NameMapError)
    drop = raw.get("drop", False)
    if not isinstance(drop, bool):
        raise NameMapError(f"{label}: drop must be true or false")
    to = raw.get("to")
    if drop == (to is not None):
        raise NameMapError(f"{label}: give either to = '...' (the reference name) or drop = true")
    if to is not None and not isinstance(to, str):
        raise NameMapError(f"{label}: to must be a string")
    source = pattern if kind == "regex" else glob_to_regex(pattern)
    try:
        compiled = re.compile(source)
    except re.error as exc:
        raise NameMapError(f"{label}: bad regular expression {pattern!r}: {exc}") from exc
    if to is not None:
        groups = {int(g) for g in re.findall(r"\\(\d+)", to)} | {
            int(g) for g in re.findall(r"\\g<(\d+)>", to)}
        if groups and max(groups) > compiled.groups:
            raise NameMapError(f"{label}: to = {to!r} refers to group {max(groups)} but the {kind} has only "
                               f"{compiled.groups}")
    return Rule(index=index, kind=kind, pattern=pattern, to=to, drop=drop, compiled=compiled)


def _check_target(target: str, key: str, rule: Rule) -> None:
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
