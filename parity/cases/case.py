"""One parity case end to end: capture the reference (and the fp64 oracle), run the candidate free and
isolated, compare, and write the case's outputs. `parity run` and `parity suite` are lists of cases."""
from __future__ import annotations

import dataclasses
import shlex
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sd_parity.candidates.protocol import supports
from sd_parity.candidates.registry import label as candidate_label, resolve
from sd_parity.candidates.runner import run_free, run_isolated
from sd_parity.errors import BadInput
from sd_parity.judging.compare import Comparison, compare_runs
from sd_parity.judging.live import run_live
from sd_parity.judging.name_map import NameMap
from sd_parity.judging.scope import Scope
from sd_parity.judging.tolerances import Tolerances
from sd_parity.judging.verdict import Verdict, make_verdict
from sd_parity.reports.summary import build_summary, render_outputs
from sd_parity.runs.cache import cached_run
from sd_parity.runs.config import RunConfig, format_scheduler_setting

from .memory import release_memory

MODES = ("free", "isolated", "both")


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


def reference_run(config: RunConfig) -> Path:
    """The cached reference run for `config`."""
    from sd_parity.reference.runner import run_reference

    return cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=False))


def with_candidate_tensors(config: RunConfig, candidate: Any) -> RunConfig:
    """`config` capturing what the candidate reports (its `tensors` spec), unless --capture was given:
    a reference tensor the candidate never reports would make every verdict incomplete."""
    tensors = getattr(candidate, "tensors", None)
    return config if config.capture is not None or tensors is None else dataclasses.replace(config, capture=tensors)


def oracle_runs(config: RunConfig, reference: Path) -> tuple[Path, Path]:
    """The cached fp64 oracles of `config`'s reference run: the whole run in fp64 (computed one network
    at a time; one run serves every dtype of a config) and the block-local oracle of `reference` (each
    block in fp64 on the inputs the reference captured; it calibrates isolated runs)."""
    from sd_parity.reference.oracle import run_block_oracle
    from sd_parity.reference.runner import run_reference

    whole = cached_run(dataclasses.replace(config, dtype="fp64"), "oracle",
                       lambda cfg, path: run_reference(cfg, path, progress=False, oracle=True))
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
               log: Callable[[str], None] = lambda line: None, kept_dir: Path | None = None) -> Judged:
    """Produce (or find cached) the case's runs and compare them: free against the fp64 oracle,
    isolated against the block-local oracle first. A live case's free run is compared as it runs
    and keeps its few full tensors in `kept_dir` (it is never cached)."""
    if case.live and (case.maps or kept_dir is None):
        raise BadInput("--live compares a candidate that uses the reference's names: give no --map" if case.maps
                       else "a live case needs a folder for the tensors it keeps")
    tolerances = tolerances or Tolerances()  # a live run measures with the rules it is judged by
    candidate = resolve(case.candidate, fault=case.fault)
    config = with_candidate_tensors(case.config, candidate)
    log(f"{case.name}: reference {config.dtype}")
    runs = {"reference": reference_run(config)}
    release_memory()
    if case.calibrated and config.dtype != "fp64":
        log(f"{case.name}: oracles fp64")
        runs["oracle"], runs["block_oracle"] = oracle_runs(config, runs["reference"])
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
            candidate, cfg, path, reference=runs["reference"]), fingerprint=fingerprint)
    if case.mode in ("isolated", "both") and (supports(candidate, "run_block") or supports(candidate, "run_stage")):
        log(f"{case.name}: {label} isolated")
        runs["isolated"] = cached_run(config, label, lambda cfg, path: run_isolated(
            candidate, cfg, runs["reference"], path), mode="isolated", fingerprint=fingerprint)
    del candidate  # and its models: the comparisons read run files only
    release_memory()
    log(f"{case.name}: compare")
    naming = dict(name_map=NameMap.load_all(case.maps) if case.maps else None,
                  scope=Scope(case.only, case.require))
    isolated_oracles = [runs[k] for k in ("block_oracle", "oracle") if k in runs] or None
    if "candidate" in runs:
        with live or nullcontext():
            comparison = compare_runs(runs["reference"], live or runs["candidate"], oracle_path=runs.get("oracle"),
                                      tolerances=tolerances, **naming)
    else:
        comparison = compare_runs(runs["reference"], runs["isolated"], oracle_path=isolated_oracles,
                                  tolerances=tolerances, **naming)
    isolated = None
    if "isolated" in runs and "candidate" in runs:
        isolated = compare_runs(runs["reference"], runs["isolated"], oracle_path=isolated_oracles,
                                tolerances=tolerances, **naming)
    return Judged(comparison, isolated, make_verdict(comparison, isolated), runs)


def run_case(case: Case, out_dir: Path, tolerances: Tolerances | None = None,
             log: Callable[[str], None] = lambda line: None) -> CaseResult:
    started = time.perf_counter()
    judged = judge_case(case, tolerances, log, kept_dir=out_dir)
    summary = build_summary(judged.comparison, judged.verdict, judged.isolated)
    summary["case"] = {"name": case.name, "candidate": case.candidate, "mode": case.mode,
                       "calibrated": "oracle" in judged.runs, "repro": repro_command(case)}
    from sd_parity.reports.html.drilldown import add_drilldowns  # tensor data the HTML report drills into
    add_drilldowns(summary)
    render_outputs(summary, out_dir)
    return CaseResult(case, summary, out_dir, time.perf_counter() - started, judged.runs)


def repro_command(case: Case) -> str:
    """The `parity run` command line that reproduces this case alone."""
    c = case.config
    parts = ["parity run", f"--model {shlex.quote(c.model)}", f"--candidate {shlex.quote(case.candidate)}",
             f"--dtype {c.dtype}", f"--scheduler {c.scheduler}", f"--steps {c.steps}", f"--mode {case.mode}",
             f"--seed {c.seed}", f"--prompt {shlex.quote(c.prompt if isinstance(c.prompt, str) else c.prompt[0])}"]
    if c.pipeline != "txt2img":
        parts += [f"--pipeline {c.pipeline}", f"--init-image {shlex.quote(str(c.init_image))}",
                  f"--strength {c.strength}"]
        if c.mask_image:
            parts.append(f"--mask {shlex.quote(str(c.mask_image))}")
    parts += [f"--scheduler-config {shlex.quote(format_scheduler_setting(*item))}" for item in c.scheduler_overrides.items()]
    if c.capture:
        parts.append(f"--capture {shlex.quote(c.capture)}")
    if not case.calibrated:
        parts.append("--no-calibrate")
    if case.fault:
        parts.append(f"--inject-fault {case.fault}")
    if case.live:
        parts.append("--live")
    parts += [f"--map {shlex.quote(spec)}" for spec in case.maps] + [f"--only {shlex.quote(g)}" for g in case.only]
    if case.require != "all":
        parts.append(f"--require {case.require}")
    return " ".join(parts + [f"--output-dir reports/{case.name}"])
