"""One parity case end to end: capture the reference (and the fp64 oracle), run impl free and isolated,
compare, and write the case's outputs. `parity run` and `parity suite` are lists of cases."""
from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .compare import compare_runs
from .impl_runner import run_impl, run_impl_isolated
from .run_cache import cached_run
from .runconfig import RunConfig
from .summary import build_summary, render_outputs
from .tolerances import Tolerances
from .verdict import make_verdict

MODES = ("free", "isolated", "both")


@dataclass
class Case:
    config: RunConfig
    backend: str
    mode: str = "both"
    calibrated: bool = True
    label: str = ""

    @property
    def name(self) -> str:
        c = self.config
        return self.label or f"{c.pipeline}-{c.scheduler}-{self.backend}-{c.dtype}"


@dataclass
class CaseResult:
    case: Case
    summary: dict[str, Any]
    out_dir: Path
    seconds: float
    runs: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.summary["verdict"]["status"] == "parity"


def _reference(config: RunConfig) -> Path:
    """The reference run for `config`; an injected fault belongs to the candidate only."""
    from reference.runner import run_reference

    config = dataclasses.replace(config, extra={k: v for k, v in config.extra.items() if k != "fault"})
    return cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=False))


def run_case(case: Case, out_dir: Path, tolerances: Tolerances | None = None,
             log: Callable[[str], None] = lambda line: None) -> CaseResult:
    started = time.perf_counter()
    config = case.config
    log(f"{case.name}: reference {config.dtype}")
    runs = {"reference": _reference(config)}
    if case.calibrated and config.dtype != "fp64":
        log(f"{case.name}: oracle fp64")
        runs["oracle"] = _reference(dataclasses.replace(config, dtype="fp64"))
    if case.mode in ("free", "both"):
        log(f"{case.name}: impl {case.backend} free")
        runs["candidate"] = cached_run(config, case.backend, lambda cfg, path: run_impl(
            cfg, path, case.backend, reference=runs["reference"]))
    if case.mode in ("isolated", "both"):
        log(f"{case.name}: impl {case.backend} isolated")
        runs["isolated"] = cached_run(config, case.backend, lambda cfg, path: run_impl_isolated(
            cfg, runs["reference"], path, case.backend), mode="isolated")
    log(f"{case.name}: compare")
    main = runs.get("candidate", runs.get("isolated"))
    comparison = compare_runs(runs["reference"], main, oracle_path=runs.get("oracle"), tolerances=tolerances)
    isolated = None
    if "isolated" in runs and "candidate" in runs:
        isolated = compare_runs(runs["reference"], runs["isolated"], oracle_path=runs.get("oracle"),
                                tolerances=tolerances)
    summary = build_summary(comparison, make_verdict(comparison, isolated), isolated)
    summary["case"] = {"name": case.name, "backend": case.backend, "mode": case.mode,
                       "calibrated": "oracle" in runs, "repro": repro_command(case)}
    from .report.drilldown import add_drilldowns  # tensor data the HTML report drills into
    add_drilldowns(summary)
    render_outputs(summary, out_dir)
    return CaseResult(case, summary, out_dir, time.perf_counter() - started, runs)


def repro_command(case: Case) -> str:
    """The `parity run` command line that reproduces this case alone."""
    c = case.config
    parts = ["parity run", f"--model {c.model}", f"--backend {case.backend}", f"--dtype {c.dtype}",
             f"--scheduler {c.scheduler}", f"--steps {c.steps}", f"--mode {case.mode}", f"--seed {c.seed}",
             f"--prompt {shlex.quote(c.prompt if isinstance(c.prompt, str) else c.prompt[0])}"]
    if c.pipeline != "txt2img":
        parts += [f"--pipeline {c.pipeline}", f"--init-image {c.init_image}", f"--strength {c.strength}"]
        if c.mask_image:
            parts.append(f"--mask {c.mask_image}")
    if c.capture:
        parts.append(f"--capture {shlex.quote(c.capture)}")
    if not case.calibrated:
        parts.append("--no-calibrate")
    if "fault" in c.extra:
        parts.append(f"--inject-fault {c.extra['fault']}")
    return " ".join(parts + [f"--output-dir reports/{case.name}"])
