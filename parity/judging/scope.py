"""What a comparison expects from the candidate: `parity compare --only GLOB --require blocks|pipeline|all`.

A port that dumps only block outputs, or only its UNet, gets a verdict on what it provided:
  - `--only GLOB` (repeatable) restricts the comparison to reference tensors matching a glob (the
    dialect of naming.glob_to_regex; with a '/', the pattern matches component/invocation/name,
    otherwise the name alone, as tolerance overrides do). Everything else is out of scope.
  - `--require blocks` asks only for block-level tensors (naming.is_block_level: block outputs and
    inputs, top-level modules, component outputs, pipeline tensors); `--require pipeline` only for
    pipeline tensors; `--require all` (default) for everything. A reference tensor that is not required
    is compared when the candidate has it and left out when it does not.
Left-out tensors are counted in coverage.scope and named in the verdict, never dropped silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sd_parity.runs.naming import glob_to_regex, is_block_level

REQUIRE = ("all", "blocks", "pipeline")


class ScopeError(ValueError):
    """A --only or --require value that cannot be used."""


@dataclass
class Scope:
    only: tuple[str, ...] = ()
    require: str = "all"
    _patterns: list[tuple[bool, re.Pattern]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.require not in REQUIRE:
            raise ScopeError(f"--require {self.require!r}: use one of {', '.join(REQUIRE)}")
        for pattern in self.only:
            if not pattern:
                raise ScopeError("--only needs a glob, e.g. --only 'unet/**'")
            self._patterns.append(("/" in pattern, re.compile(glob_to_regex(pattern))))

    @property
    def restricts(self) -> bool:
        return bool(self.only) or self.require != "all"

    def selects(self, key: str) -> bool:
        """Whether reference key `key` is within --only."""
        if not self._patterns:
            return True
        name = key.split("/", 2)[-1]
        return any(p.fullmatch(key if whole else name) for whole, p in self._patterns)

    def requires(self, component: str, name: str) -> bool:
        """Whether the candidate must provide this reference tensor."""
        if self.require == "all":
            return True
        if self.require == "pipeline":
            return component == "pipeline"
        return is_block_level(component, name)

    def describe(self) -> dict[str, Any]:
        return {"only": list(self.only), "require": self.require}


@dataclass
class ScopeCoverage:
    """Reference tensors the comparison left out, and why."""

    only: list[str] = field(default_factory=list)
    require: str = "all"
    outside_only: int = 0  # reference tensors not matching --only
    not_required: list[str] = field(default_factory=list)  # absent from the candidate, not required
    no_counterpart: list[dict[str, str]] = field(default_factory=list)  # absent, and the name map says why

    @property
    def left_out(self) -> int:
        return self.outside_only + len(self.not_required) + len(self.no_counterpart)

    def in_only(self, scope: Scope, entries: list) -> list:
        """The reference entries within --only (the rest are counted as outside it)."""
        kept = [e for e in entries if scope.selects(e.key)]
        self.outside_only += len(entries) - len(kept)
        return kept

    def leaves_out(self, scope: Scope, entry, no_counterpart: str | None) -> bool:
        """Whether a reference tensor the candidate lacks is left out (and noted) rather than missing."""
        if no_counterpart is not None:
            self.no_counterpart.append({"key": entry.key, "reason": no_counterpart})
            return True
        if not scope.requires(entry.component, entry.name):
            self.not_required.append(entry.key)
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"only": self.only, "require": self.require, "outside_only": self.outside_only,
                "not_required": self.not_required, "no_counterpart": self.no_counterpart}


def scope_clause(scope: dict[str, Any], ref_tensors: int) -> str:
    """The verdict's statement of what was left out (empty when nothing was)."""
    parts = []
    if scope["outside_only"]:
        parts.append(f"{scope['outside_only']} outside --only {' '.join(scope['only'])}")
    if scope["not_required"]:
        parts.append(f"{len(scope['not_required'])} not provided and not required (--require {scope['require']})")
    if scope["no_counterpart"]:
        parts.append(f"{len(scope['no_counterpart'])} with no counterpart in the candidate's naming "
                     f"(e.g. {scope['no_counterpart'][0]['key']})")
    if not parts:
        return ""
    left_out = scope["outside_only"] + len(scope["not_required"]) + len(scope["no_counterpart"])
    return f"; judged on {ref_tensors - left_out} of {ref_tensors} reference tensors: {', '.join(parts)}"
