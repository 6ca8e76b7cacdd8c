"""Compare two run files tensor by tensor, in the reference's execution order.

Works from run files alone (numpy + h5py): no torch, no model code. Tensors are read one at a time
from each file (reference, candidate and, with an oracle, the oracle) and dropped before the next,
so memory stays at about the two largest tensors (plus the oracle's) and a few MiB of scratch.

Every reference tensor gets a row (pass, fail, missing, shape_mismatch or skipped), then every
candidate tensor that no reference tensor matched (extra), in the candidate's order. Nothing is left
out silently: dtype differences, shape differences that are only size-1 dimensions, missing and
extra invocations (UNet steps included) are all listed; reference tensors outside --only, not
required by --require or without a counterpart in the name map's naming are counted in
coverage.scope. The candidate is seen through the name map (name_map.py: names, splits, transforms),
and each divergent tensor through the diagnosis (diagnosis.py: the known mistakes that explain it).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sd_parity.errors import BadInput
from .derived import judge_derived
from .diagnosis import Diagnoser, Diagnosis, summarize
from .cross_device import describe as describe_devices, device_pair, widened
from .metrics import ExactMetrics, FloatMetrics, exact_metrics, is_float, oracle_error, tensor_metrics
from .name_map import CandidateView, NameMap, Resolution
from . import pool
from .oracles import Oracles, oracle_paths
from .scope import Scope, ScopeCoverage
from sd_parity.runs.naming import block_of, module_path
from sd_parity.runs.buffers import Buffers
from sd_parity.runs.hdf5 import Entry, RunReader
from sd_parity.runs.open import open_run
from .tolerances import Decision, Tolerances, dtype_decision, identical, judge

STATUSES = ("pass", "fail", "missing", "extra", "shape_mismatch", "skipped")
DIVERGENT = ("fail", "shape_mismatch")
_STEP_RE = re.compile(r"^step_(\d+)$")
# Metadata fields that must agree for a comparison to mean anything (others, like impl, dtype,
# versions or paths, are expected to differ).
SETTING_KEYS = ("model_hash", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance",
                "height", "width", "eta", "karras", "images_per_prompt", "x_T_sha256")


@dataclass
class TensorResult:
    index: int  # position in Comparison.results
    key: str  # the reference key (for extra tensors: the mapped candidate key)
    component: str
    invocation: str
    name: str
    kind: str
    status: str
    order: int | None  # execution order in the reference (None for extra tensors)
    cand_key: str | None = None  # the candidate's own key (differs from key under a name map)
    cand_order: int | None = None
    ref_dtype: str | None = None
    cand_dtype: str | None = None
    ref_shape: list[int] | None = None
    cand_shape: list[int] | None = None
    metrics: FloatMetrics | ExactMetrics | None = None
    decision: Decision | None = None
    notes: list[str] = field(default_factory=list)
    diagnoses: list[Diagnosis] = field(default_factory=list)  # known mistakes that explain a divergence

    @property
    def step(self) -> int | None:
        match = _STEP_RE.match(self.invocation)
        return int(match.group(1)) if match else None

    @property
    def block(self):
        return block_of(self.component, self.name) if self.component != "pipeline" else None

    @property
    def block_id(self) -> str | None:
        block = self.block
        return block.test_id if block is not None else None

    @property
    def module(self) -> str:
        return module_path(self.name) if self.component != "pipeline" else self.name

    @property
    def ratio(self) -> float | None:
        return self.decision.ratio if self.decision is not None else None

    @property
    def divergent(self) -> bool:
        return self.status in DIVERGENT

    @property
    def identical(self) -> bool:
        """Compared and bit for bit the reference's values, in the reference's dtype."""
        return (self.metrics is not None and self.ref_dtype == self.cand_dtype and identical(self.metrics))


@dataclass
class Coverage:
    ref_tensors: int = 0
    cand_tensors: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STATUSES})
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    shape_mismatch: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    dtype_differences: list[dict[str, Any]] = field(default_factory=list)
    missing_invocations: list[str] = field(default_factory=list)
    extra_invocations: list[str] = field(default_factory=list)
    unmatched_names: list[str] = field(default_factory=list)
    dropped_names: list[str] = field(default_factory=list)
    redundant_names: list[str] = field(default_factory=list)  # candidate tensors whose values others provided
    scope: ScopeCoverage = field(default_factory=ScopeCoverage)  # reference tensors left out, and why

    @property
    def compared(self) -> int:
        return self.counts["pass"] + self.counts["fail"]


@dataclass
class Comparison:
    ref_path: Path
    cand_path: Path
    oracle_path: Path | None
    ref_metadata: dict[str, Any]
    cand_metadata: dict[str, Any]
    oracle_metadata: dict[str, Any] | None
    results: list[TensorResult]
    coverage: Coverage
    tolerances: Tolerances
    name_map: NameMap | None
    warnings: list[str]
    seconds: float
    bytes_read: int
    diagnosis: dict[str, Any] | None = None  # diagnosis.summarize(): the mistakes that explain divergences
    oracle_paths: list[Path] = field(default_factory=list)  # most specific first (see judging.oracles)

    @property
    def mode(self) -> str | None:
        """The candidate's run mode from its metadata: "free", "isolated", or None when not recorded."""
        return self.cand_metadata.get("mode")

    @property
    def calibrated(self) -> bool:
        return self.oracle_path is not None

    def divergent(self) -> list[TensorResult]:
        return [r for r in self.results if r.divergent]

    def first_divergence(self) -> TensorResult | None:
        return next((r for r in self.results if r.divergent), None)

    def identical(self) -> bool:
        """Every reference tensor compared, and each bit-identical to the candidate's."""
        compared = [r for r in self.results if r.status != "extra"]
        return bool(compared) and all(r.identical for r in compared)


def compare_runs(ref_path: str | os.PathLike, cand_path: "str | os.PathLike | LiveRun", *,
                 oracle_path: str | os.PathLike | list | tuple | None = None,
                 name_map: NameMap | str | os.PathLike | None = None,
                 tolerances: Tolerances | str | os.PathLike | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 scope: Scope | None = None) -> Comparison:
    """Compare a candidate run with the reference run (and, given an fp64 oracle run, calibrate;
    several oracle runs are looked up in order, see judging.oracles).

    `cand_path` may also be the LiveRun a live comparison (live.py) returned: its tensors were measured as
    they were produced. `scope` limits what the candidate is expected to provide (scope.py). Raises RunFileError for
    unreadable run files, NameMapError / ToleranceConfigError for bad maps or configs: all bad input.
    """
    from .live import LiveRun

    started = time.perf_counter()
    if name_map is not None and not isinstance(name_map, NameMap):
        name_map = NameMap.load(name_map)
    if tolerances is None:
        tolerances = Tolerances()
    elif not isinstance(tolerances, Tolerances):
        tolerances = Tolerances.load(tolerances)
    with open_run(ref_path) as ref, (cand_path if isinstance(cand_path, LiveRun) else open_run(cand_path)) as cand:
        paths = oracle_paths(oracle_path)
        oracle = Oracles(paths) if paths else None
        try:
            return _compare(ref, cand, oracle, name_map, tolerances, progress, started, scope or Scope())
        finally:
            if oracle is not None:
                oracle.close()


def _compare(ref: RunReader, cand: RunReader, oracle: Oracles | None, name_map: NameMap | None,
             tolerances: Tolerances, progress, started: float, scope: Scope) -> Comparison:
    all_ref_entries = ref.entries()
    cand_entries = cand.entries()
    devices = device_pair(ref.metadata, cand.metadata)
    if devices is not None and oracle is None:
        tolerances = widened(tolerances)
    mapped: Resolution = (name_map or NameMap()).resolve(cand_entries, all_ref_entries, ref.metadata)
    view = CandidateView(cand)
    diagnoser = Diagnoser(ref, view, ref.metadata)
    coverage = Coverage(ref_tensors=len(all_ref_entries), cand_tensors=len(cand_entries),
                        unmatched_names=list(mapped.unmatched) if name_map is not None else [],
                        dropped_names=list(mapped.dropped),
                        scope=ScopeCoverage(list(scope.only), scope.require))
    ref_entries = coverage.scope.in_only(scope, all_ref_entries)
    results: list[TensorResult] = []
    used: set[str] = set()
    bytes_read = 0
    sources = _Sources(ref, view, mapped.sources, isolated=cand.metadata.get("mode") == "isolated")
    pairs = []
    for entry in ref_entries:
        match = mapped.sources.get(entry.key)
        if match is None and coverage.scope.leaves_out(scope, entry, mapped.absent.get(entry.key)):
            continue
        pairs.append((entry, match))

    total = len(pairs)

    recycled = Buffers(keep=pool.DEFAULT_BUDGET)

    def measure_pair(pair):  # on the pool's threads: reads and metrics only, the index is set in order below
        with recycled.lease():  # the tensors read here are dropped when it returns
            return _compare_one(ref, view, oracle, *pair, tolerances, -1, sources)

    def cost(pair) -> int:  # what measuring the pair holds in memory at once (the oracle's is float64)
        entry, match = pair
        return (entry.nbytes + match.nbytes) * (2 if oracle is not None else 1) if match is not None else 0

    for position, ((entry, match), (result, nbytes)) in enumerate(pool.ordered_map(measure_pair, pairs, cost)):
        if progress is not None:
            progress(position, total, entry.key)
        result.index = len(results)
        if match is not None:
            used.add(match.key)
        bytes_read += nbytes
        if match is not None:
            result.notes.extend(match.notes)
        if result.divergent:
            result.diagnoses = diagnoser.diagnose(result, entry, match)
            result.notes.extend(f"diagnosis: {d.text}" for d in result.diagnoses)
        results.append(result)

    extra, coverage.redundant_names = mapped.leftovers(used, {e.key for e in all_ref_entries})
    for cand_key in extra:
        entry = cand.entry(cand_key)
        key = mapped.mapping.get(entry.key, entry.key)
        if not scope.selects(key):
            continue
        component, invocation, name = key.split("/", 2)
        results.append(TensorResult(
            index=len(results), key=key, component=component, invocation=invocation, name=name,
            kind=entry.kind, status="extra", order=None, cand_key=entry.key, cand_order=entry.order,
            cand_dtype=entry.dtype, cand_shape=list(entry.shape),
            notes=["only in the candidate"] + ([f"candidate name {entry.key}"] if key != entry.key else [])))
    diagnoser.diagnose_extras(results)

    _fill_coverage(coverage, results, ref_entries, cand_entries, mapped)
    _refuse_empty_comparison(coverage, ref.path, cand.path)
    warnings = _metadata_warnings(ref.metadata, cand.metadata) + _nonfinite_warnings(results)
    if oracle is not None:
        warnings += oracle.warnings(ref, SETTING_KEYS)
    if devices is not None:
        warnings.append(describe_devices(devices, calibrated=oracle is not None))
    warnings = [f"{_label(cand.metadata)}: {w}" for w in warnings]
    if name_map is not None and mapped.unmatched:
        warnings.append(f"{len(mapped.unmatched)} candidate tensor(s) matched no rule of the name map "
                        f"({name_map.unmatched_policy}): first {mapped.unmatched[0]}")
    return Comparison(
        ref_path=ref.path, cand_path=cand.path, oracle_path=oracle.path if oracle is not None else None,
        ref_metadata=ref.metadata, cand_metadata=cand.metadata,
        oracle_metadata=oracle.metadata if oracle is not None else None,
        results=results, coverage=coverage, tolerances=tolerances, name_map=name_map, warnings=warnings,
        seconds=time.perf_counter() - started, bytes_read=bytes_read,
        diagnosis=summarize(results, diagnoser.examined, diagnoser.limit),
        oracle_paths=oracle.paths if oracle is not None else [])


def _label(cand_metadata: dict) -> str:
    """Which comparison a warning comes from: the free run's or the isolated run's."""
    return f"{cand_metadata.get('mode') or 'candidate'} run"


class _Sources:
    """Source tensors of derived tensors, by reference key: the candidate's own (through the name map);
    for an isolated run, whose stages were fed the reference's tensors, the reference's."""

    def __init__(self, ref: RunReader, cand: CandidateView, by_ref_key: dict[str, Entry], isolated: bool):
        self.ref, self.cand, self.by_ref_key, self.isolated = ref, cand, by_ref_key, isolated

    def __call__(self, key: str):
        match = self.by_ref_key.get(key)
        if match is not None:
            return self.cand.read(match)
        if self.isolated and key in self.ref:
            return self.ref.read(key)
        return None


def _compare_one(ref: RunReader, cand: CandidateView, oracle: Oracles | None, entry: Entry,
                 match: Entry | None, tolerances: Tolerances, index: int, sources: _Sources) -> tuple[TensorResult, int]:
    result = TensorResult(index=index, key=entry.key, component=entry.component, invocation=entry.invocation,
                          name=entry.name, kind=entry.kind, status="missing", order=entry.order,
                          ref_dtype=entry.dtype, ref_shape=list(entry.shape))
    if match is not None:
        result.cand_key = match.key
        result.cand_order = match.order
        result.cand_dtype = match.dtype
        result.cand_shape = list(match.shape)
        if match.key != entry.key:
            result.notes.append(f"candidate name {match.key}")
    judge_dtype = _judging_dtype(entry.dtype, match.dtype if match is not None else None)
    rule = tolerances.rule_for(entry.component, entry.invocation, entry.name, judge_dtype)
    if rule.skip:
        result.status = "skipped"
        result.notes.append(f"skipped by override {rule.override.pattern!r}: {rule.override.reason}")
        return result, 0
    if match is None:
        result.notes.append("not in the candidate")
        return result, 0
    if tuple(entry.shape) != tuple(match.shape):
        if _squeezed(entry.shape) != _squeezed(match.shape):
            result.status = "shape_mismatch"
            result.notes.append(f"shape {list(match.shape)} in the candidate, {list(entry.shape)} in the reference")
            return result, 0
        result.notes.append(f"shapes differ only in size-1 dimensions ({list(match.shape)} vs "
                            f"{list(entry.shape)}); compared element by element")
    if entry.dtype != match.dtype:
        allowed = " (allowed by an override)" if rule.any_dtype else ""
        result.notes.append(f"dtype differs: reference {entry.dtype}, candidate {match.dtype}{allowed}; compared "
                            f"after casting, judged with {judge_dtype} tolerances")
    decision = None
    live = getattr(cand.reader, "measured", None)  # a live run (live.py) measured its tensors as they came
    if live is not None and not cand.reader.holds(match.key):
        metrics, ref_err, cand_err, notes = live(match.key, rule)
        nbytes = 0
    else:
        ref_array = ref.read(entry)
        cand_array = cand.read(match).reshape(ref_array.shape)
        metrics, ref_err, cand_err, notes, oracle_bytes = measure(ref_array, cand_array, oracle, entry, rule,
                                                                  judge_dtype)
        nbytes = entry.nbytes + match.nbytes + oracle_bytes
        del ref_array
        decision = judge_derived(entry.component, entry.invocation, entry.name, cand_array, sources, rule,
                                 ref.metadata.get("guidance"))
        del cand_array
    result.notes.extend(notes)
    if decision is not None:
        result.notes.append("judged by its derivation from its own sources (see judging.derived)")
    else:
        decision = judge(metrics, rule, ref_vs_oracle=ref_err, cand_vs_oracle=cand_err)
    decision = dtype_decision(decision, rule, entry.dtype, match.dtype)
    result.metrics = metrics
    result.decision = decision
    result.status = "pass" if decision.passed else "fail"
    if decision.passed and result.identical:
        decision.reason = "identical"
    return result, nbytes


def measure(ref_array: np.ndarray, cand_array: np.ndarray, oracle: Oracles | None, entry: Entry, rule,
            judge_dtype: str) -> tuple[FloatMetrics | ExactMetrics, Any, Any, list[str], int]:
    """(metrics, reference vs oracle, candidate vs oracle, notes, oracle bytes read) for one tensor pair:
    what a comparison from files and a live one (live.py) both compute."""
    notes: list[str] = []
    nbytes = 0
    metrics = tensor_metrics(ref_array, cand_array, rtol=rule.rtol, atol=rule.atol)
    ref_err = cand_err = None
    if oracle is not None and isinstance(metrics, FloatMetrics):
        found = oracle.read(entry.key, tuple(entry.shape))
        if found is not None:
            oracle_array, oracle_entry = found
            nbytes += oracle_entry.nbytes
            ref_err = oracle_error(ref_array, oracle_array)
            cand_err = oracle_error(cand_array, oracle_array)
            del oracle_array
            if oracle_entry.dtype != "float64":
                notes.append(f"oracle tensor is {oracle_entry.dtype}, not float64")
        else:
            reason = "not in the oracle run" if not oracle.holds(entry.key) else "has another shape in the oracle run"
            notes.append(f"{reason}: judged with the {judge_dtype} default tolerance instead")
    elif oracle is not None and entry.dtype == "uint8":
        # an 8-bit image: calibrate on how far the reference's own image is from the fp64 run's
        found = oracle.read(entry.key, tuple(entry.shape))
        if found is not None:
            oracle_array = found[0].reshape(ref_array.shape)
            ref_err, cand_err = exact_metrics(oracle_array, ref_array), exact_metrics(oracle_array, cand_array)
    return metrics, ref_err, cand_err, notes, nbytes


def _refuse_empty_comparison(coverage: Coverage, ref_path: Path, cand_path: Path) -> None:
    """A comparison that judged no tensor must not read as parity (missing tensors already do not)."""
    if coverage.compared or coverage.counts["missing"] or coverage.counts["shape_mismatch"]:
        return
    skipped = coverage.counts["skipped"]
    raise BadInput(f"compared zero tensors: the reference {ref_path} holds {coverage.ref_tensors}, the candidate "
                   f"{cand_path} {coverage.cand_tensors}" + (f", and overrides skip all {skipped}" if skipped else "")
                   + "; give runs that hold tensors, and overrides that leave some to judge")


def _nonfinite_warnings(results: list[TensorResult]) -> list[str]:
    """Tensors whose NaN/Inf sit at the same places on both sides: they agree there, but nothing was compared."""
    agreeing = [r for r in results if isinstance(r.metrics, FloatMetrics) and r.metrics.nonfinite_mismatch == 0
                and r.metrics.finite < r.metrics.numel]
    if not agreeing:
        return []
    first = agreeing[0].metrics
    return [f"{len(agreeing)} tensor(s) hold NaN/Inf at the same places in both runs (first {agreeing[0].key}: "
            f"{first.numel - first.finite} of {first.numel} elements); those elements were not compared, and a "
            "NaN in the reference usually means an overflow upstream"]


def _judging_dtype(ref_dtype: str, cand_dtype: str | None) -> str:
    """The candidate's dtype decides the tolerance; an integer candidate of a float reference uses ref's."""
    if cand_dtype is None:
        return ref_dtype
    if is_float(ref_dtype) and not is_float(cand_dtype):
        return ref_dtype
    return cand_dtype


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape if s != 1)


def _fill_coverage(coverage: Coverage, results: list[TensorResult], ref_entries: list[Entry],
                   cand_entries: list[Entry], mapped: Resolution) -> None:
    for result in results:
        coverage.counts[result.status] += 1
        if result.status == "missing":
            coverage.missing.append(result.key)
        elif result.status == "extra":
            coverage.extra.append(result.key)
        elif result.status == "shape_mismatch":
            coverage.shape_mismatch.append({"key": result.key, "ref_shape": result.ref_shape,
                                            "cand_shape": result.cand_shape})
        elif result.status == "skipped":
            rule = result.notes[-1] if result.notes else ""
            coverage.skipped.append({"key": result.key, "note": rule})
        if result.cand_dtype and result.ref_dtype and result.cand_dtype != result.ref_dtype:
            coverage.dtype_differences.append({"key": result.key, "ref_dtype": result.ref_dtype,
                                               "cand_dtype": result.cand_dtype})
    ref_inv = _invocations(e.key for e in ref_entries)
    cand_inv = _invocations(mapped.mapping[e.key] for e in cand_entries if e.key in mapped.mapping)
    coverage.missing_invocations = [i for i in ref_inv if i not in cand_inv]
    coverage.extra_invocations = [i for i in cand_inv if i not in ref_inv]


def _invocations(keys) -> list[str]:
    seen: dict[str, None] = {}
    for key in keys:
        component, invocation, _ = key.split("/", 2)
        seen.setdefault(f"{component}/{invocation}", None)
    return list(seen)


def _metadata_warnings(ref_meta: dict, cand_meta: dict) -> list[str]:
    warnings = []
    for key in SETTING_KEYS:
        if key in ref_meta and key in cand_meta and ref_meta[key] != cand_meta[key]:
            warnings.append(f"runs differ in {key}: reference {ref_meta[key]!r}, candidate {cand_meta[key]!r}; "
                            "the comparison may not be meaningful")
    if ref_meta.get("mode") == "isolated":
        warnings.append("the reference run is marked isolated; the reference should be a free run")
    return warnings
