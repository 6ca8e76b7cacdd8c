"""Parity checks from Python: cached reference runs, candidate runs, and `assert_parity`.

    ref = sd_parity.reference_run("tiny-sd1", steps=2, capture="blocks")     # cached on disk
    cand = sd_parity.run_candidate(make_my_port(), ref, mode="isolated")
    sd_parity.assert_parity(ref, cand, only="unet_block_1_down")

The pytest plugin (sd_parity.pytest_plugin) wraps these as fixtures; docs/ports.md is the tutorial.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sd_parity.runs.naming import glob_to_regex
from sd_parity.errors import BadInput, SdParityError
from sd_parity.runs.config import RunConfig

BAD = ("fail", "shape_mismatch", "missing")


class NotAtParity(SdParityError, AssertionError):
    """assert_parity's failure: `summary` is the comparison (docs/summary-format.md), `report` the HTML
    report to open."""

    def __init__(self, message: str, summary: dict[str, Any], report: Path):
        super().__init__(message)
        self.summary, self.report = summary, report


class Reference(os.PathLike):
    """A reference run file for `config`, captured once and cached on disk, and its fp64 oracle run
    (captured on first use of `oracle`, for calibrated thresholds). Usable wherever a path is."""

    def __init__(self, config: RunConfig, path: Path, calibrated: bool = True):
        self.config, self.path, self.calibrated = config, Path(path), calibrated
        self._oracle: Path | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def oracle(self) -> Path | None:
        """The fp64 run of the reference (None when not calibrated, or for an fp64 reference)."""
        if self._oracle is None and self.calibrated and self.config.dtype != "fp64":
            self._oracle = _cached_reference(dataclasses.replace(self.config, dtype="fp64"))
        return self._oracle

    @property
    def model_dir(self) -> Path:
        return self.config.model_dir()

    def replay(self):
        """The reference's x_T, token ids and recorded noise (sd_parity.ReferenceReplay; close it, or use `with`)."""
        from sd_parity.candidates.replay import ReferenceReplay

        return ReferenceReplay(self.path)

    def __repr__(self) -> str:
        return f"<sd_parity reference run {self.path.name}: {self.config.model} {self.config.dtype}>"


def _cached_reference(config: RunConfig) -> Path:
    from sd_parity.cases.case import reference_run as cached

    return cached(config)


def reference_run(model: str = "tiny-sd1", *, calibrated: bool = True, **fields: Any) -> Reference:
    """The reference run for RunConfig(model, **fields) (prompt, steps, scheduler, dtype, capture, ...),
    captured with diffusers on first use and cached in the user cache (SD_PARITY_RUN_CACHE)."""
    config = RunConfig(model=model, **fields)
    return Reference(config, _cached_reference(config), calibrated)


def config_of(reference: str | os.PathLike) -> RunConfig:
    """The RunConfig a reference run was captured with (from the run file's metadata)."""
    if isinstance(reference, Reference):
        return reference.config
    from sd_parity.runs.open import open_run

    with open_run(reference) as reader:
        metadata = reader.metadata
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{key: value for key, value in metadata.items() if key in names})


def run_candidate(candidate: Any, reference: str | os.PathLike, mode: str = "free") -> Path:
    """Run `candidate` (an object, or a --candidate SPEC) against `reference` in `mode` ("free": its
    whole pipeline replaying the reference's inputs; "isolated": each block and stage on the reference's
    captured inputs) and return its run file, kept in the run cache (reused while the candidate's
    `fingerprint()` is unchanged; a candidate without one is run every time)."""
    from sd_parity.candidates.protocol import supports
    from sd_parity.candidates.registry import checked, label, resolve
    from sd_parity.candidates.runner import run_free, run_isolated
    from sd_parity.runs.cache import cached_run

    if mode not in ("free", "isolated"):
        raise BadInput(f"run_candidate: mode {mode!r} is not free or isolated")
    if isinstance(candidate, str):
        name, candidate = label(candidate), resolve(candidate)
    else:
        candidate = checked(candidate, type(candidate).__name__)
        name = label(str(candidate.name))
    reference_path = Path(reference)
    config = config_of(reference)
    fingerprint = candidate.fingerprint() if callable(getattr(candidate, "fingerprint", None)) else None
    if mode == "free":
        return cached_run(config, name, lambda cfg, path: run_free(candidate, cfg, path, reference=reference_path),
                          fingerprint=fingerprint)
    if not (supports(candidate, "run_block") or supports(candidate, "run_stage")):
        raise BadInput(f"run_candidate: {name} has neither run_block nor run_stage, so it cannot run isolated")
    return cached_run(config, name, lambda cfg, path: run_isolated(candidate, cfg, reference_path, path),
                      mode="isolated", fingerprint=fingerprint)


# --- assert_parity -----------------------------------------------------------------------------------

_REPORT_FOLDER: ContextVar[Callable[[], Path] | None] = ContextVar("sd_parity_report_folder", default=None)


@dataclasses.dataclass(frozen=True)
class Baselines:
    """Where assert_parity finds a check's baseline summary (`read`) and writes its summary as the next
    baseline (`write`); each is None or gives the folder for this check (the pytest plugin's
    --parity-baseline and --parity-write-baseline)."""

    read: Callable[[], Path] | None = None
    write: Callable[[], Path] | None = None


_BASELINES: ContextVar[Baselines] = ContextVar("sd_parity_baselines", default=Baselines())


@contextmanager
def baselines(where: Baselines) -> Iterator[None]:
    token = _BASELINES.set(where)
    try:
        yield
    finally:
        _BASELINES.reset(token)


@contextmanager
def report_folder(folder: Callable[[], Path]) -> Iterator[None]:
    """Where assert_parity writes reports inside this block (`folder()` is called only when needed);
    the pytest plugin sets one per test."""
    token = _REPORT_FOLDER.set(folder)
    try:
        yield
    finally:
        _REPORT_FOLDER.reset(token)


def assert_parity(ref: str | os.PathLike, cand: str | os.PathLike, oracle: str | os.PathLike | None = None,
                  map: str | os.PathLike | None = None, only: str | Iterable[str] | None = None, *,  # noqa: A002
                  isolated: str | os.PathLike | None = None, tolerances: str | os.PathLike | None = None,
                  report_dir: str | os.PathLike | None = None, baseline: str | os.PathLike | None = None,
                  baseline_margin: float | None = None) -> dict[str, Any]:
    """Raise NotAtParity unless the candidate run `cand` agrees with the reference run `ref`.

    `oracle`: the reference's fp64 run, for calibrated thresholds (default: `ref.oracle` when `ref`
    comes from reference_run / the parity_reference fixture). `map`: a name map (NAMES.toml) from the
    candidate's names to the reference's. `only`: judge only these tensors: block ids
    (`unet_block_1_down`), components (`unet`, `pipeline`) or globs over keys (`unet/*/down_blocks.1*`).
    In an isolated run, block inputs are the reference's own and are not judged. `isolated`: an
    isolated-mode run too, to name culprit blocks. The failure message names the worst tensor, its
    metrics and threshold, and the HTML report written for it (into `report_dir`, by default the
    test's folder under pytest's temporary folder, or a new temporary folder). `baseline`: a previous
    summary.json (or its folder; by default the test's folder under the plugin's --parity-baseline DIR, when
    it holds one): then only a regression since it fails (judging.baseline), not a divergence it shares.
    Deviations accepted in `tolerances` ([[deviation]]) count as agreement. Returns the summary."""
    __tracebackhide__ = True
    from sd_parity.judging.compare import compare_runs
    from sd_parity.judging.verdict import make_verdict
    from sd_parity.reports.summary import build_summary

    for label, path in (("ref", ref), ("cand", cand), ("oracle", oracle), ("isolated", isolated)):
        if path is not None and not Path(path).is_file():
            raise BadInput(f"assert_parity: {label} {os.fspath(path)} is not a file")
    oracle = oracle if oracle is not None else getattr(ref, "oracle", None)
    comparison = compare_runs(ref, cand, oracle_path=oracle, name_map=map, tolerances=tolerances)
    isolated_comparison = (compare_runs(ref, isolated, oracle_path=oracle, name_map=map, tolerances=tolerances)
                           if isolated is not None else None)
    summary = build_summary(comparison, make_verdict(comparison, isolated_comparison), isolated_comparison)
    selected = _selected(comparison, only)
    bad = [r for r in selected if r.status in BAD]
    compared = [r for r in selected if r.status in ("pass", "fail", "accepted")]
    regression = _against_baseline(summary, selected, baseline, baseline_margin)
    failed = bool(regression["regressed"]) if regression is not None else bool(bad)
    if report_dir is not None or failed or not compared:
        report = _write_report(summary, report_dir)
    _write_baseline(summary)
    if compared and not failed:
        return summary
    message = _failure_message(summary, comparison, selected, bad, only, report)
    if regression is not None:
        message = f"{regression['text']}\nBaseline: {regression['path']}\n{message}"
    raise NotAtParity(message, summary, report)


def _against_baseline(summary: dict[str, Any], selected: list, baseline, margin: float | None) -> dict | None:
    """The baseline section of `summary` for the selected tensors, when a baseline is given or found."""
    from sd_parity.judging.baseline import DEFAULT_MARGIN, compare_to_baseline, load_baseline

    if baseline is None:
        folder = _BASELINES.get().read
        found = folder() / "summary.json" if folder is not None else None
        baseline = found if found is not None and found.is_file() else None
    if baseline is None:
        return None
    section = compare_to_baseline(summary, load_baseline(baseline), margin or DEFAULT_MARGIN,
                                  keys={r.key for r in selected})
    summary["baseline"] = section
    return section


def _write_baseline(summary: dict[str, Any]) -> None:
    from sd_parity.reports.summary import write_summary

    folder = _BASELINES.get().write
    if folder is not None:
        write_summary(summary, folder())


def _selected(comparison, only: str | Iterable[str] | None) -> list:
    """The reference's tensors that `only` selects and that the candidate run is expected to hold: in an
    isolated run, inputs (fed from the reference) and pipeline tensors (only some stages produce any)
    may be absent, but a block or module output may not."""
    patterns = None if only is None else [only] if isinstance(only, str) else list(only)
    isolated = comparison.mode == "isolated"
    rows = [r for r in comparison.results if r.status != "extra" and not (
        isolated and r.status == "missing" and (r.kind == "input" or r.component == "pipeline"))]
    if patterns is not None:
        globs = [re.compile(glob_to_regex(p)) for p in patterns]  # the project's one glob dialect
        rows = [r for r in rows if any(p in (r.block_id, r.component) or g.fullmatch(r.key)
                                       for p, g in zip(patterns, globs))]
        if not rows:
            raise BadInput(f"assert_parity: only={only!r} selects none of the reference's tensors; give block "
                           "ids (unet_block_1_down), components (unet, pipeline) or globs over keys "
                           "(unet/*/down_blocks.1*)")
    return rows


def _write_report(summary: dict[str, Any], report_dir: str | os.PathLike | None) -> Path:
    from sd_parity.reports.html import REPORT_FILE
    from sd_parity.reports.html.drilldown import add_drilldowns
    from sd_parity.reports.summary import render_outputs

    if report_dir is None:
        folder = _REPORT_FOLDER.get()
        report_dir = folder() if folder is not None else tempfile.mkdtemp(prefix="sd-parity-report-")
    add_drilldowns(summary)
    render_outputs(summary, report_dir)
    return Path(report_dir).resolve() / REPORT_FILE


def _failure_message(summary, comparison, selected, bad, only, report: Path) -> str:
    from sd_parity.judging.verdict import describe_location
    from sd_parity.reports.summary import metric_line, threshold_line

    rows = summary["tensors"]
    diverging = [r for r in bad if r.status != "missing"]
    missing = [r for r in bad if r.status == "missing"]
    scope = f" in {only if isinstance(only, str) else ', '.join(only)}" if only is not None else ""
    runs = f"candidate {Path(comparison.cand_path).name}" + (f" ({comparison.mode} mode)" if comparison.mode else "")
    if not bad:
        return (f"Not at parity{scope}: the candidate holds none of the {len(selected)} selected tensors\n"
                f"Runs: {runs} vs reference {Path(comparison.ref_path).name}\nReport: {report.as_uri()}")
    lines = [f"Not at parity{scope}: {len(diverging)} of {len(selected)} tensors diverge"
             + (f", {len(missing)} missing from the candidate" if missing else ""),
             f"Runs: {runs} vs reference {Path(comparison.ref_path).name}, "
             + ("calibrated against the fp64 oracle" if comparison.calibrated else "uncalibrated (no oracle run)")]
    if diverging:
        worst = max(diverging, key=lambda r: (r.status == "shape_mismatch", r.ratio or 0.0))
        row = rows[worst.index]
        lines.append(f"Worst tensor: {describe_location(worst)}")
        if worst.status == "shape_mismatch":
            lines.append(f"  shape:     {row['cand_shape']} in the candidate, {row['ref_shape']} in the reference")
        else:
            lines.append(f"  metrics:   {metric_line(row)}")
            lines.append(f"  threshold: {threshold_line(row)}")
            lines.append(f"  ratio:     {_number(worst.ratio)} x its threshold")
        first = diverging[0]
        if first is not worst:
            lines.append(f"First divergence (execution order): {describe_location(first)}")
        others = [r for r in diverging if r is not worst and r is not first]
        if others:
            lines.append("Also diverging: " + ", ".join(f"{r.key} ({_number(r.ratio)}x)" for r in others[:5])
                         + (f" and {len(others) - 5} more" if len(others) > 5 else ""))
    if missing:
        lines.append(f"Missing from the candidate: {missing[0].key}" + (f" and {len(missing) - 1} more"
                                                                         if len(missing) > 1 else ""))
    lines += [f"Warning: {w}" for w in comparison.warnings[:3]]
    lines.append(f"Report: {report.as_uri()}")
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def safe_name(text: str) -> str:
    """A file name for a test id (`tests/test_port.py::test_block[fp16]` -> `test_port.py-test_block-fp16`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.split("/")[-1]).strip("-")[:120] or "check"
