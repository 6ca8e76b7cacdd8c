"""Pass/fail thresholds for one tensor: dtype defaults, calibrated (oracle) mode, per-name overrides.

docs/tolerances.md is the user-facing description; the numbers below are the single source.

Default mode ("normwise"), for the candidate's dtype:
  1. normwise: ||c - r|| <= rtol * ||r|| + atol * sqrt(n): the norm of the error against the norm of the
     tensor, because deep in a network every element carries error from the sums of many upstream
     terms, which scales with the tensor, not with the element (docs/tolerances.md has the evidence);
  2. outlier guard: max |c - r| <= outlier_factor * (atol + rtol * max |r|), so no element is wild;
  3. non-finite: NaN/Inf must sit at the same places on both sides (nonfinite_mismatch == 0).
Calibrated mode ("calibrated"), with an fp64 oracle run of the reference:
  1. e(c) <= k * e(r) + floor, e(x) = ||x - o|| / ||o|| and floor = floor_ulps * eps(dtype);
  2. max |c - o| <= outlier_factor * max |r - o| + floor * max |o|;
  3. the candidate has no more non-finite values where the oracle is finite than the reference.
Integer and bool tensors ("exact") must be equal (or within an override's atol, e.g. 1 for the image).
Derived tensors (guided noise prediction, 8-bit image) are judged by what they derive from
(sd_parity.judging.derived). A candidate tensor in another float dtype than the reference's fails
("dtype") unless an override sets any_dtype = true.

Each decision carries `ratio`: the largest criterion value / its limit, so pass <=> ratio <= 1.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sd_parity.errors import BadInput

from .metrics import ExactMetrics, FloatMetrics, OracleError, eps, is_float
from .name_map import glob_to_regex, one_pattern

# Default mode per dtype: (rtol, atol) of ||c - r|| <= rtol ||r|| + atol sqrt(n). rtol is a budget of
# accumulated rounding error relative to the tensor's norm, set from the worst error measured between
# correct implementations deep in full-size runs, with room (docs/tolerances.md, "Default mode");
# atol = rtol / 100 only matters for tensors far below unit scale.
DTYPE_DEFAULTS: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-6),
    "float16": (6e-2, 6e-4),
    "bfloat16": (2.5e-1, 2.5e-3),
    "float64": (1e-12, 1e-14),
}
DEFAULT_K = {"float64": 4.0, "float32": 4.0, "float16": 3.0, "bfloat16": 3.0}
DEFAULT_QUANTILE = 0.999  # 8-bit images: the share of pixels that must round alike
DEFAULT_OUTLIER_FACTOR = 10.0
DEFAULT_FLOOR_ULPS = 2.0
_NUMERIC = ("rtol", "atol", "k", "floor_ulps", "quantile", "outlier_factor")
_FLAGS = ("skip", "any_dtype")


class ToleranceConfigError(BadInput, ValueError):
    """A tolerance configuration that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Override:
    pattern: str
    reason: str
    kind: str = "glob"  # "glob" (this project's dialect, see namemap.glob_to_regex) or "regex"
    rtol: float | None = None
    atol: float | None = None
    k: float | None = None
    floor_ulps: float | None = None
    quantile: float | None = None
    outlier_factor: float | None = None
    skip: bool = False
    any_dtype: bool = False  # the candidate may hold this tensor in another float dtype than the reference
    compiled: re.Pattern | None = field(default=None, compare=False, repr=False)

    def matches(self, component: str, invocation: str, name: str) -> bool:
        """A pattern with a '/' is matched against component/invocation/name, otherwise against name."""
        assert self.compiled is not None
        subject = f"{component}/{invocation}/{name}" if "/" in self.pattern else name
        if self.kind == "regex":
            return self.compiled.search(subject) is not None
        return self.compiled.fullmatch(subject) is not None

    def describe(self) -> dict[str, Any]:
        out = {"pattern": self.pattern, "kind": self.kind, "reason": self.reason}
        for key in _NUMERIC:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for flag in _FLAGS:
            if getattr(self, flag):
                out[flag] = True
        return out


@dataclass(frozen=True)
class Rule:
    """The settings that apply to one tensor, after dtype defaults and the first matching override."""

    dtype: str
    rtol: float
    atol: float
    k: float
    floor_ulps: float
    quantile: float
    outlier_factor: float
    skip: bool = False
    any_dtype: bool = False
    override: Override | None = None

    @property
    def floor(self) -> float:
        """The calibrated floor: floor_ulps ULPs of the dtype, for tensors the reference computes (almost)
        exactly, where k times its error is ~0 while an equally good candidate rounds once more."""
        return self.floor_ulps * eps(self.dtype) if is_float(self.dtype) else 0.0


@dataclass
class Decision:
    passed: bool
    ratio: float  # max over criteria of value / limit; pass <=> ratio <= 1
    mode: str  # "normwise" | "calibrated" | "exact" | "image_levels" | "derived"
    criteria: list[dict[str, Any]]  # each: name, value, limit, ratio, passed
    settings: dict[str, Any]  # the rule's numbers that were used
    reason: str  # one line: what failed, or "within tolerance"
    source: str = "default"  # "default" | "override" | "config"
    override: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        # shallow: the values are plain numbers, lists and dicts already (asdict's deep copy is slow)
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _ratio(value: float, limit: float) -> float:
    if value <= 0:
        return 0.0
    if limit <= 0:
        return math.inf
    return value / limit


def criterion(name: str, value: float, limit: float, what: str) -> dict[str, Any]:
    ratio = _ratio(value, limit)
    return {"name": name, "value": value, "limit": limit, "ratio": ratio, "passed": ratio <= 1.0,
            "description": what}


@dataclass
class Tolerances:
    dtypes: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DTYPE_DEFAULTS))
    k: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_K))
    quantile: float = DEFAULT_QUANTILE
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR
    floor_ulps: float = DEFAULT_FLOOR_ULPS
    overrides: list[Override] = field(default_factory=list)
    source: str | None = None
    reason: str | None = None  # why the global settings differ from the defaults, when they do
    isolation_only: str = "fail"  # what a failure seen only in isolation does to the exit code: fail | pass

    # -- loading ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tolerances":
        """From a parity.toml (the [tool.parity] table's content at top level) or a pyproject.toml."""
        path = Path(path)
        if not path.is_file():
            raise ToleranceConfigError(f"config file {path} does not exist; pass a parity.toml or a "
                                       "pyproject.toml with a [tool.parity] table to --config")
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ToleranceConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        if "tool" in data or path.name == "pyproject.toml":
            table = data.get("tool", {}).get("parity")
            if table is None:
                raise ToleranceConfigError(f"{path} has no [tool.parity] table")
        else:
            table = data
        return cls.from_table(table, source=str(path))

    @classmethod
    def discover(cls, folder: str | os.PathLike = ".") -> "Tolerances":
        """parity.toml in `folder`, else its pyproject.toml if that has [tool.parity], else defaults."""
        folder = Path(folder)
        if (folder / "parity.toml").is_file():
            return cls.load(folder / "parity.toml")
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                with open(pyproject, "rb") as handle:
                    data = tomllib.load(handle)
            except tomllib.TOMLDecodeError:
                return cls()
            if "parity" in data.get("tool", {}):
                return cls.from_table(data["tool"]["parity"], source=str(pyproject))
        return cls()

    @classmethod
    def from_table(cls, table: dict, source: str | None = None) -> "Tolerances":
        """`table` is [tool.parity]: keys other than `tolerances` and `overrides` belong to other commands."""
        where = source or "config"
        if not isinstance(table, dict):
            raise ToleranceConfigError(f"{where}: [tool.parity] must be a table")
        settings = table.get("tolerances", {})
        raw_overrides = table.get("overrides", [])
        if not isinstance(settings, dict):
            raise ToleranceConfigError(f"{where}: [tolerances] must be a table")
        if not isinstance(raw_overrides, list):
            raise ToleranceConfigError(f"{where}: overrides must be an array of tables ([[overrides]])")
        tol = cls(source=source)
        allowed = {"quantile", "outlier_factor", "floor_ulps", "isolation_only", "reason", *DTYPE_DEFAULTS}
        unknown = set(settings) - allowed
        if unknown:
            raise ToleranceConfigError(f"{where}: unknown keys in [tolerances]: {sorted(unknown)}; allowed: "
                                       f"{sorted(allowed)}")
        changed = [key for key in ("quantile", "outlier_factor", "floor_ulps", "isolation_only") if key in settings]
        if changed:
            tol.reason = _require_reason(settings, f"{where}: [tolerances] sets {', '.join(sorted(changed))}")
        if "isolation_only" in settings:
            if settings["isolation_only"] not in ("fail", "pass"):
                raise ToleranceConfigError(f"{where}: tolerances.isolation_only = {settings['isolation_only']!r}: "
                                           "use \"fail\" (the default) or \"pass\"")
            tol.isolation_only = settings["isolation_only"]
        for key in ("quantile", "outlier_factor", "floor_ulps"):
            if key in settings:
                setattr(tol, key, _number(settings[key], f"{where}: tolerances.{key}", key))
        for dtype in DTYPE_DEFAULTS:
            if dtype not in settings:
                continue
            sub = settings[dtype]
            label = f"{where}: [tolerances.{dtype}]"
            if not isinstance(sub, dict):
                raise ToleranceConfigError(f"{label} must be a table with rtol, atol and/or k")
            extra = set(sub) - {"rtol", "atol", "k", "reason"}
            if extra:
                raise ToleranceConfigError(f"{label}: unknown keys {sorted(extra)}; use rtol, atol, k, reason")
            _require_reason(sub, label)
            rtol, atol = tol.dtypes[dtype]
            tol.dtypes[dtype] = (_number(sub.get("rtol", rtol), f"{label} rtol", "rtol"),
                                 _number(sub.get("atol", atol), f"{label} atol", "atol"))
            if "k" in sub:
                tol.k[dtype] = _number(sub["k"], f"{label} k", "k")
        tol.overrides = [_parse_override(raw, i, where) for i, raw in enumerate(raw_overrides, start=1)]
        return tol

    # -- per tensor -----------------------------------------------------------------------------------

    def rule_for(self, component: str, invocation: str, name: str, dtype: str) -> Rule:
        """Settings for one tensor judged in `dtype` (the candidate's dtype)."""
        rtol, atol = self.dtypes.get(dtype, (0.0, 0.0))
        rule = Rule(dtype=dtype, rtol=rtol, atol=atol, k=self.k.get(dtype, 2.0), floor_ulps=self.floor_ulps,
                    quantile=self.quantile, outlier_factor=self.outlier_factor)
        for override in self.overrides:
            if override.matches(component, invocation, name):
                changes = {key: getattr(override, key) for key in _NUMERIC if getattr(override, key) is not None}
                return replace(rule, skip=override.skip, any_dtype=override.any_dtype, override=override, **changes)
        return rule

    def matching_override(self, component: str, invocation: str, name: str) -> Override | None:
        for override in self.overrides:
            if override.matches(component, invocation, name):
                return override
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "reason": self.reason,
            "dtypes": {d: {"rtol": r, "atol": a, "k": self.k.get(d)} for d, (r, a) in self.dtypes.items()},
            "quantile": self.quantile,
            "outlier_factor": self.outlier_factor,
            "floor_ulps": self.floor_ulps,
            "isolation_only": self.isolation_only,
            "overrides": [o.describe() for o in self.overrides],
        }


# ---------------------------------------------------------------------------------------------------
# decisions


def judge(metrics: FloatMetrics | ExactMetrics, rule: Rule, *, ref_vs_oracle: OracleError | None = None,
          cand_vs_oracle: OracleError | None = None) -> Decision:
    """Pass or fail for one compared tensor. Oracle errors given -> calibrated mode."""
    source = "override" if rule.override is not None else "default"
    override = rule.override.describe() if rule.override is not None else None
    if isinstance(metrics, ExactMetrics) and rule.dtype == "uint8":
        # An 8-bit image is round(pixel * 255) of a float image: float differences far below one level
        # still flip the rounding of pixels that sit on a half-level boundary, so a pixel may be one
        # level off, in at most the rule's quantile share of the image (the impl floor: >= 99.9% equal).
        levels = max(rule.atol, 1.0)
        allowed = metrics.numel * (1.0 - rule.quantile)
        if isinstance(ref_vs_oracle, ExactMetrics) and isinstance(cand_vs_oracle, ExactMetrics):
            # Calibrated: at half precision the reference's own image is several levels off the fp64
            # run's; the candidate's may be k times as far, in k times as many pixels.
            levels = max(levels, rule.k * ref_vs_oracle.max_abs)
            allowed = max(allowed, rule.k * ref_vs_oracle.mismatches)
            value, count, what = cand_vs_oracle.max_abs, cand_vs_oracle.mismatches, "the oracle's"
        else:
            value, count, what = metrics.max_abs, metrics.mismatches, "the reference's"
        criteria = [criterion("levels", value, levels, f"max |c - {what} image| in 8-bit levels"),
                    criterion("quantile", count, allowed,
                               f"pixels that differ from {what} image (at most {allowed:.4g} of {metrics.numel})")]
        settings = {"dtype": rule.dtype, "atol": levels, "quantile": rule.quantile, "mismatches": count,
                    "calibrated": what == "the oracle's"}
        return decide("image_levels", criteria, settings, source, override)
    if isinstance(metrics, ExactMetrics):
        # Other integer/bool tensors (token ids, ...) must be equal; an override's atol allows that
        # much |c - r| per element.
        criteria = [criterion("exact", metrics.max_abs, rule.atol,
                               "max |c-r| (0 unless an override sets atol)")]
        settings = {"dtype": rule.dtype, "atol": rule.atol, "mismatches": metrics.mismatches}
        return decide("exact", criteria, settings, source, override)
    if ref_vs_oracle is not None and cand_vs_oracle is not None:
        return _calibrated(metrics, rule, ref_vs_oracle, cand_vs_oracle, source, override)
    n = metrics.finite
    norm_limit = rule.rtol * metrics.ref_l2 + rule.atol * math.sqrt(n)
    outlier_limit = rule.outlier_factor * (rule.atol + rule.rtol * metrics.ref_abs_max)
    criteria = [
        criterion("normwise", metrics.diff_l2, norm_limit, "||c-r|| vs rtol * ||r|| + atol * sqrt(n)"),
        criterion("outlier", metrics.max_abs, outlier_limit,
                   "max |c-r| vs outlier_factor * (atol + rtol * max|r|)"),
        criterion("nonfinite", metrics.nonfinite_mismatch, 0, "NaN/Inf at different places (must be 0)"),
    ]
    settings = {"dtype": rule.dtype, "rtol": rule.rtol, "atol": rule.atol, "outlier_factor": rule.outlier_factor,
                "rel_l2": metrics.rel_l2, "norm_limit": norm_limit, "outlier_limit": outlier_limit}
    return decide("normwise", criteria, settings, source, override)


def identical(metrics: FloatMetrics | ExactMetrics) -> bool:
    """Bit for bit the same values (dtypes aside): no difference and NaN/Inf in the same places."""
    if isinstance(metrics, ExactMetrics):
        return metrics.mismatches == 0
    return metrics.max_abs == 0 and metrics.nonfinite_mismatch == 0


def dtype_decision(decision: Decision, rule: Rule, ref_dtype: str, cand_dtype: str) -> Decision:
    """Dtype is part of parity: a float tensor the candidate holds in another dtype than the reference
    (a bf16 run leaving a LayerNorm output in fp32) fails, unless an override sets any_dtype."""
    if ref_dtype == cand_dtype or not (is_float(ref_dtype) and is_float(cand_dtype)) or rule.any_dtype:
        return decision
    mismatch = criterion("dtype", 1, 0, f"the candidate holds {cand_dtype}, the reference {ref_dtype} "
                                        "(an override with any_dtype = true allows it)")
    return decide(decision.mode, decision.criteria + [mismatch], decision.settings, decision.source,
                  decision.override)


def _calibrated(metrics: FloatMetrics, rule: Rule, ref_err: OracleError, cand_err: OracleError,
                source: str, override) -> Decision:
    floor = rule.floor
    if ref_err.oracle_l2 > 0:
        statistic, ref_e, cand_e = "rel_l2", ref_err.rel_l2, cand_err.rel_l2
        floor_e = floor
    else:  # the oracle is all zeros: relative error is undefined, use the absolute RMS
        statistic, ref_e, cand_e = "rms", ref_err.rms, cand_err.rms
        floor_e = rule.atol
    limit = rule.k * ref_e + floor_e
    max_limit = rule.outlier_factor * ref_err.max_abs + floor * ref_err.oracle_abs_max
    if ref_err.oracle_abs_max == 0:
        max_limit = rule.outlier_factor * ref_err.max_abs + rule.atol
    criteria = [
        criterion("calibrated", cand_e, limit, f"candidate {statistic} vs oracle <= k * reference's + floor"),
        criterion("calibrated_max", cand_err.max_abs, max_limit,
                   "candidate max|c-o| <= outlier_factor * reference's max|r-o| + floor * max|o|"),
        criterion("nonfinite", max(0, cand_err.nonfinite - ref_err.nonfinite), 0,
                   "NaN/Inf where the oracle is finite, beyond the reference's own"),
    ]
    settings = {"dtype": rule.dtype, "k": rule.k, "floor_ulps": rule.floor_ulps, "floor": floor_e,
                "statistic": statistic, "ref_error": ref_e, "cand_error": cand_e, "limit": limit,
                "outlier_factor": rule.outlier_factor, "ref_max_error": ref_err.max_abs,
                "cand_max_error": cand_err.max_abs, "max_limit": max_limit,
                "ref_vs_oracle": ref_err.to_dict(), "cand_vs_oracle": cand_err.to_dict()}
    return decide("calibrated", criteria, settings, source, override)


def decide(mode: str, criteria: list[dict], settings: dict, source: str, override) -> Decision:
    ratio = max((c["ratio"] for c in criteria), default=0.0)
    failed = [c for c in criteria if not c["passed"]]
    if failed:
        reason = "; ".join(f"{c['name']}: {_fmt(c['value'])} > {_fmt(c['limit'])}" for c in failed)
    else:
        reason = "within tolerance"
    return Decision(passed=not failed, ratio=ratio, mode=mode, criteria=criteria, settings=settings,
                    reason=reason, source=source, override=override)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------------
# parsing helpers


def _require_reason(table: dict, label: str) -> str:
    reason = table.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ToleranceConfigError(f"{label} has no reason; add reason = \"why this tolerance differs\" "
                                   "(every tolerance change must say why)")
    return reason.strip()


def _number(value, label: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ToleranceConfigError(f"{label} = {value!r}: expected a finite number >= 0")
    if key == "quantile" and not 0 < value <= 1:
        raise ToleranceConfigError(f"{label} = {value!r}: a quantile is in (0, 1], e.g. 0.999")
    return float(value)


def _parse_override(raw, index: int, where: str) -> Override:
    label = f"{where}: overrides[{index}]"
    if not isinstance(raw, dict):
        raise ToleranceConfigError(f"{label} must be a table ([[tool.parity.overrides]])")
    allowed = {"pattern", "regex", "reason", *_FLAGS, *_NUMERIC}
    unknown = set(raw) - allowed
    if unknown:
        raise ToleranceConfigError(f"{label}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    kind, pattern = one_pattern(raw, ("pattern", "regex"), label, ToleranceConfigError)
    label = f"{where}: override {pattern!r}"
    reason = _require_reason(raw, label)
    flags = {flag: raw.get(flag, False) for flag in _FLAGS}
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ToleranceConfigError(f"{label}: {flag} must be true or false")
    values = {key: _number(raw[key], f"{label} {key}", key) for key in _NUMERIC if key in raw}
    if not values and not any(flags.values()):
        raise ToleranceConfigError(f"{label} changes nothing; set rtol, atol, k, floor_ulps, quantile, "
                                   "outlier_factor, any_dtype = true or skip = true")
    try:
        compiled = re.compile(pattern if kind == "regex" else glob_to_regex(pattern))
    except re.error as exc:
        raise ToleranceConfigError(f"{label}: bad regular expression: {exc}") from exc
    return Override(pattern=pattern, reason=reason, kind="regex" if kind == "regex" else "glob",
                    compiled=compiled, **flags, **values)
