"""One parity case end to end: capture the reference (and the fp64 oracle), run the candidate free and
isolated, compare, and write the case's outputs. `parity run` and `parity suite` are lists of cases.

A case's folder holds its report (report.html, summary.json, details.json.gz, junit.xml), its run
files under runs/ (hard links into the run cache, copies across file systems) and repro.sh, which
reruns the case."""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sd_parity.candidates.protocol import supports
from sd_parity.candidates.registry import label as candidate_label, resolve
from sd_parity.candidates.runner import run_free, run_isolated
from sd_parity.errors import BadInput
from sd_parity.fixtures import FIXTURES
from sd_parity.judging.compare import Comparison, compare_runs
from sd_parity.judging.live import run_live
from sd_parity.judging.name_map import NameMap
from sd_parity.judging.scope import Scope
from sd_parity.judging.tolerances import Tolerances
from sd_parity.judging.verdict import Verdict, make_verdict
from sd_parity.outputs import release_temporary, temp_path, write_atomic
from sd_parity.progress import count_progress
from sd_parity.reports.summary import build_summary, render_outputs
from sd_parity.runs.cache import cached_run
from sd_parity.runs.config import RunConfig, format_scheduler_setting

from .memory import release_memory

MODES = ("free", "isolated", "both")
RUNS_DIR = "runs"  # the case's run files, by role: reference.h5, oracle.h5, candidate.h5, isolated.h5
REPRO_FILE = "repro.sh"
RERUN_DIR = "rerun"  # where repro.sh writes, inside the case's folder, unless given another


@dataclass
class Case:
    config: RunConfig
    candidate: str  # a --candidate SPEC: numpy, torch, an entry-point name, pkg.module:factory, port.py:factory
    mode: str = "both"
    calibrated: bool = True
    fault: str | None = None  # a known bug injected into impl/ (sd_parity.candidates.faults)
    label: str = ""
    maps: tuple[str, ...] = ()  # --map specs: the candidate's names onto the reference's
    only: tuple[str, ...] = ()  # --only globs
    require: str = "all"  # --require
    live: bool = False  # --live: the free run compared as it runs, only what the report needs kept (judging.live)

    @property
    def name(self) -> str:
        c = self.config
        return self.label or f"{c.pipeline}-{c.scheduler}-{candidate_label(self.candidate)}-{c.dtype}"


@dataclass
class CaseResult:
    case: Case
    summary: dict[str, Any]
    out_dir: Path
    seconds: float
    runs: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        baseline = self.summary.get("baseline")  # against a baseline, only a regression fails
        return not baseline["regressed"] if baseline else self.summary["verdict"]["exit_code"] == 0


def reference_run(config: RunConfig, progress: bool = False) -> Path:
    """The cached reference run for `config` (a bar over its denoising steps with `progress`)."""
    from sd_parity.reference.runner import run_reference

    return cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=progress))


def phase_count(case: Case) -> int:
    """The phases run_case announces through `log` (for a progress bar over several cases)."""
    oracle = case.calibrated and case.config.dtype != "fp64"
    return 3 + oracle + (case.mode in ("free", "both")) + (case.mode in ("isolated", "both"))


def with_candidate_tensors(config: RunConfig, candidate: Any) -> RunConfig:
    """`config` capturing what the candidate reports (its `tensors` spec), unless --capture was given:
    a reference tensor the candidate never reports would make every verdict incomplete."""
    tensors = getattr(candidate, "tensors", None)
    return config if config.capture is not None or tensors is None else dataclasses.replace(config, capture=tensors)


def oracle_runs(config: RunConfig, reference: Path, progress: bool = False) -> tuple[Path, Path]:
    """The cached fp64 oracles of `config`'s reference run: the whole run in fp64 (computed one network
    at a time; one run serves every dtype of a config) and the block-local oracle of `reference` (each
    block in fp64 on the inputs the reference captured; it calibrates isolated runs)."""
    from sd_parity.reference.oracle import run_block_oracle
    from sd_parity.reference.runner import run_reference

    whole = cached_run(dataclasses.replace(config, dtype="fp64"), "oracle",
                       lambda cfg, path: run_reference(cfg, path, progress=progress, oracle=True))
    blocks = cached_run(config, "block-oracle", lambda cfg, path: run_block_oracle(cfg, reference, path))
    return whole, blocks


@dataclass
class Judged:
    """A case's comparisons, before any report is written."""

    comparison: Comparison
    isolated: Comparison | None
    verdict: Verdict
    runs: dict[str, Path]


def judge_case(case: Case, tolerances: Tolerances | None = None,
               log: Callable[[str], None] = lambda line: None, progress: bool = False,
               runs_dir: Path | None = None, kept_dir: Path | None = None) -> Judged:
    """Produce (or find cached) the case's runs and compare them: free against the fp64 oracle,
    isolated against the block-local oracle first. `log` hears each phase as it starts (phase_count of
    them but the last); `progress` draws bars within phases (denoising steps, tensors compared); the
    run files are kept in `runs_dir` when given (keep_runs). A live case's free run is compared as it
    runs and keeps its few full tensors in `kept_dir` (it is never cached)."""
    if case.live and (case.maps or kept_dir is None):
        raise BadInput("--live compares a candidate that uses the reference's names: give no --map" if case.maps
                       else "a live case needs a folder for the tensors it keeps")
    tolerances = tolerances or Tolerances()  # a live run measures with the rules it is judged by
    candidate = resolve(case.candidate, fault=case.fault)
    config = with_candidate_tensors(case.config, candidate)
    log(f"{case.name}: reference {config.dtype}")
    runs = {"reference": reference_run(config, progress)}
    release_memory()
    if case.calibrated and config.dtype != "fp64":
        log(f"{case.name}: oracles fp64")
        runs["oracle"], runs["block_oracle"] = oracle_runs(config, runs["reference"], progress)
        release_memory()
    fingerprint = candidate.fingerprint() if hasattr(candidate, "fingerprint") else None
    label = candidate_label(case.candidate)
    live = None
    if case.mode in ("free", "both") and case.live:
        log(f"{case.name}: {label} free, compared live")
        kept_dir.mkdir(parents=True, exist_ok=True)
        live = run_live(candidate, config, runs["reference"], kept_dir / f"{label}-free-live.h5",
                        tolerances=tolerances, oracle=runs.get("oracle"))
        runs["candidate"] = live.path
    elif case.mode in ("free", "both"):
        log(f"{case.name}: {label} free")
        runs["candidate"] = cached_run(config, label, lambda cfg, path: run_free(
            candidate, cfg, path, reference=runs["reference"], progress=progress), fingerprint=fingerprint)
    if case.mode in ("isolated", "both"):
        if supports(candidate, "run_block") or supports(candidate, "run_stage"):
            log(f"{case.name}: {label} isolated")
            runs["isolated"] = cached_run(config, label, lambda cfg, path: run_isolated(
                candidate, cfg, runs["reference"], path), mode="isolated", fingerprint=fingerprint)
        else:
            log(f"{case.name}: {label} isolated: not supported (no run_block or run_stage), skipped")
    del candidate  # and its models: the comparisons read run files only
    release_memory()
    log(f"{case.name}: compare")
    if runs_dir is not None:
        runs = keep_runs(runs, runs_dir)
    naming = dict(name_map=NameMap.load_all(case.maps) if case.maps else None,
                  scope=Scope(case.only, case.require))
    isolated_oracles = [runs[k] for k in ("block_oracle", "oracle") if k in runs] or None
    if "candidate" in runs:
        with live or nullcontext():
            comparison = compare_runs(runs["reference"], live or runs["candidate"], oracle_path=runs.get("oracle"),
                                      tolerances=tolerances, progress=count_progress(progress, "compare"), **naming)
    else:
        comparison = compare_runs(runs["reference"], runs["isolated"], oracle_path=isolated_oracles,
                                  tolerances=tolerances, progress=count_progress(progress, "compare"), **naming)
    isolated = None
    if "isolated" in runs and "candidate" in runs:
        isolated = compare_runs(runs["reference"], runs["isolated"], oracle_path=isolated_oracles,
                                tolerances=tolerances, progress=count_progress(progress, "compare isolated"),
                                **naming)
    return Judged(comparison, isolated, make_verdict(comparison, isolated), runs)


def run_case(case: Case, out_dir: Path, tolerances: Tolerances | None = None,
             log: Callable[[str], None] = lambda line: None, progress: bool = False,
             link_runs: bool = True) -> CaseResult:
    """Run `case` and write its folder `out_dir` (reports, repro.sh, and with `link_runs` its run files in
    runs/); `log` hears each phase as it starts (phase_count of them)."""
    started = time.perf_counter()
    judged = judge_case(case, tolerances, log, progress, runs_dir=out_dir / RUNS_DIR if link_runs else None,
                        kept_dir=out_dir)
    log(f"{case.name}: report")
    summary = build_summary(judged.comparison, judged.verdict, judged.isolated)
    config_path = getattr(tolerances, "source", None)
    summary["case"] = {"name": case.name, "candidate": case.candidate, "mode": case.mode,
                       "calibrated": "oracle" in judged.runs,
                       "repro": repro_command(case, out_dir / RERUN_DIR, config_path),
                       "script": str((out_dir / REPRO_FILE).resolve())}
    from sd_parity.reports.html.drilldown import add_drilldowns  # tensor data the HTML report drills into
    add_drilldowns(summary)
    render_outputs(summary, out_dir)
    write_repro_script(case, out_dir, config_path)
    return CaseResult(case, summary, out_dir, time.perf_counter() - started, judged.runs)


def keep_runs(runs: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The case's run files in `folder`, named by role: hard links of the cached files (nothing is
    copied), copies where the cache is on another file system. Each replaces the one before it whole."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = {}
    for role, source in runs.items():
        target = folder / f"{role}{source.suffix if source.is_file() else ''}"
        temporary = temp_path(target)
        try:
            if source.is_dir():
                shutil.copytree(source, temporary)
            else:
                try:
                    os.link(source, temporary)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(source, temporary)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)
            release_temporary(temporary)
        kept[role] = target.resolve()  # the report names them from any folder
    return kept


def repro_command(case: Case, output_dir: Path, config: str | None = None) -> str:
    """The `parity run` command line that reproduces this case alone, from any folder (paths absolute)."""
    c = case.config
    model = c.model if c.model in FIXTURES else _absolute(c.model)
    parts = ["parity run", f"--model {shlex.quote(model)}",
             f"--candidate {shlex.quote(_absolute_spec(case.candidate))}", f"--dtype {c.dtype}",
             f"--scheduler {c.scheduler}", f"--steps {c.steps}", f"--mode {case.mode}", f"--seed {c.seed}"]
    parts += [f"--prompt {shlex.quote(p)}" for p in c.prompts()]
    negatives = [c.negative_prompt] if isinstance(c.negative_prompt, str) else c.negative_prompt or []
    parts += [f"--negative-prompt {shlex.quote(p)}" for p in negatives]
    for option, value, default in (("--guidance", c.guidance, 7.5), ("--eta", c.eta, 0.0),
                                   ("--images-per-prompt", c.images_per_prompt, 1), ("--device", c.device, "cpu")):
        if value != default:
            parts.append(f"{option} {shlex.quote(str(value))}")
    parts += [f"--height {c.height}", f"--width {c.width}"] + (["--karras"] if c.karras else [])
    if c.pipeline != "txt2img":
        parts += [f"--pipeline {c.pipeline}", f"--init-image {shlex.quote(_absolute(str(c.init_image)))}",
                  f"--strength {c.strength}"]
        if c.mask_image:
            parts.append(f"--mask {shlex.quote(_absolute(str(c.mask_image)))}")
    parts += [f"--scheduler-config {shlex.quote(format_scheduler_setting(*item))}" for item in c.scheduler_overrides.items()]
    if c.capture:
        parts.append(f"--capture {shlex.quote(c.capture)}")
    if not case.calibrated:
        parts.append("--no-calibrate")
    if config:
        parts.append(f"--config {shlex.quote(_absolute(config))}")
    if case.fault:
        parts.append(f"--inject-fault {case.fault}")
    if case.live:
        parts.append("--live")
    parts += [f"--map {shlex.quote(_absolute(spec))}" for spec in case.maps]
    parts += [f"--only {shlex.quote(g)}" for g in case.only]
    if case.require != "all":
        parts.append(f"--require {case.require}")
    return " ".join(parts + [f"--output-dir {shlex.quote(str(output_dir.resolve()))}"])


def write_repro_script(case: Case, out_dir: Path, config: str | None = None) -> Path:
    """out_dir/repro.sh: reruns the case with the interpreter that ran it, into `rerun/` or the folder given."""
    rerun = out_dir.resolve() / RERUN_DIR
    command = repro_command(case, rerun, config)
    python = shlex.quote(sys.executable)
    body = command.replace("parity run", f'"${{PYTHON:-{python}}}" -m sd_parity run', 1)
    body = body.replace(f"--output-dir {shlex.quote(str(rerun))}", f'--output-dir "${{1:-{rerun}}}"')
    path = write_atomic(out_dir / REPRO_FILE, "\n".join([
        "#!/bin/sh",
        f"# Reruns parity case {case.name}: exit 0 parity, 1 divergence, 2 bad input.",
        f"# Writes into the folder given as the first argument, else {rerun}.",
        "# PYTHON chooses the interpreter (default: the one that ran the case).",
        "set -e",
        f"exec {body}", ""]))
    path.chmod(0o755)
    return path


def _absolute(path: str) -> str:
    """A path as an absolute path when it names something that exists here (fixture names stay names)."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _absolute_spec(spec: str) -> str:
    """A --candidate spec with its port file (path/to/port.py:factory) made absolute."""
    target, sep, factory = spec.rpartition(":")
    if sep and target.endswith(".py") and Path(target).exists():
        return f"{Path(target).resolve()}:{factory}"
    return spec
