"""`parity compare REF CAND [--output-dir DIR]`: tensor-by-tensor comparison of two runs (each an HDF5
run file or a run folder, docs/run-format.md).

Writes DIR (default: CAND-parity beside CAND) with report.html, summary.json, details.json.gz and
junit.xml (summary.render_outputs), prints the verdict and the worst tensors. Exit 0: parity; 1: divergence (or reference tensors missing);
2: bad input (unreadable run file, bad name map, bad tolerance config, unwritable output folder).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.escaping import printable
from sd_parity.outputs import check_output_file
from sd_parity.judging.baseline import DEFAULT_MARGIN, check_margin, compare_to_baseline, load_baseline
from sd_parity.progress import count_progress, on_terminal, table_options
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.name_map import NameMap, NameMapError
from sd_parity.judging.scope import REQUIRE, Scope, ScopeError
from sd_parity.runs.open import open_run
from sd_parity.reports.summary import DETAILS_FILE, JUNIT_FILE, SUMMARY_FILE, build_summary, format_table, render_outputs
from sd_parity.judging.tolerances import ToleranceConfigError, Tolerances
from sd_parity.judging.verdict import make_verdict
from ._options import add_parser, examples


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "compare", help="compare two run files (reference and candidate) tensor by tensor",
        description="Compare CAND with REF in the reference's execution order and write report.html, summary.json "
                    "and junit.xml into --output-dir. Runs are HDF5 run files or run folders of .npy/.safetensors "
                    "(docs/run-format.md), e.g. written by a port in any language. Exit 0 parity, 1 divergence, "
                    "2 bad input.",
        epilog=examples(
            ("parity compare ref.h5 cand.h5", "writes cand-parity/ (report.html, summary.json, junit.xml) beside cand.h5"),
            ("parity compare ref.h5 port_run/ --map ldm --output-dir reports/port",
             "a port's run folder named after the original CompVis/LDM modules"),
            ("parity compare ref.h5 cand.h5 --oracle ref-fp64.h5 --isolated cand-isolated.h5",
             "calibrated thresholds, and culprit blocks from an isolated-mode run"),
            ("parity compare ref.h5 port.h5 --only 'unet/**' --require blocks",
             "judge only the UNet, and only the block-level tensors a port dumps")))
    parser.add_argument("reference", type=Path, metavar="REF", help="the reference run (.h5 file or run folder)")
    parser.add_argument("candidate", type=Path, metavar="CAND",
                        help="the candidate run (free mode): an HDF5 run file or a run folder of .npy/.safetensors")
    add_naming_arguments(parser)
    parser.add_argument("--oracle", type=Path, default=None, metavar="ORACLE.h5",
                        help="an fp64 run of the reference (parity capture --oracle): thresholds calibrated on the "
                             "reference's own error (default: dtype tolerances)")
    parser.add_argument("--isolated", type=Path, default=None, metavar="ISO_CAND.h5",
                        help="the candidate run in isolated mode, to name culprit blocks (default: none)")
    parser.add_argument("--block-oracle", type=Path, default=None, metavar="BLOCKS.h5",
                        help="the block-local fp64 oracle of REF (parity capture --block-oracle REF): calibrates "
                             "the isolated comparison, ahead of --oracle (default: none)")
    parser.add_argument("--config", type=Path, default=None, metavar="parity.toml",
                        help="tolerance settings and overrides (a parity.toml, or a pyproject.toml with "
                             "[tool.parity]); default: ./parity.toml, else ./pyproject.toml's [tool.parity]")
    parser.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                        help="folder for report.html, summary.json and junit.xml, created if missing (default: "
                             "CAND's name + '-parity', beside CAND)")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="how many tensors the terminal table lists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_baseline_arguments(parser)
    parser.set_defaults(handler=run)


def add_baseline_arguments(parser, folder: str = "summary.json") -> None:
    """--baseline and --baseline-margin: shared by `parity compare` and `parity run`."""
    parser.add_argument("--baseline", type=Path, default=None, metavar=f"PREVIOUS/{folder}",
                        help="report only what got worse since this previous comparison (newly divergent tensors, "
                             "ratios grown beyond the margin, vanished and new tensors); exit 1 only for that "
                             "(default: none)")
    parser.add_argument("--baseline-margin", type=float, default=DEFAULT_MARGIN, metavar="FACTOR",
                        help=f"how much a tensor's ratio may grow before it counts as worse (default {DEFAULT_MARGIN})")


def default_output_dir(candidate: Path) -> Path:
    """Where compare writes without --output-dir: beside the candidate run, named after it."""
    name = candidate.resolve().name
    stem = name[:-len(candidate.suffix)] if candidate.suffix and not candidate.is_dir() else name
    return candidate.resolve().parent / f"{stem}-parity"


def add_naming_arguments(parser, model_dir: bool = True) -> None:
    """--map, --only, --require (and --model-dir): shared by `parity compare` and `parity run`."""
    parser.add_argument("--map", action="append", default=[], metavar="NAMES.toml|ldm",
                        help="name map from the candidate's tensor names to the reference's: a TOML file of rules, "
                             "or a built-in map (ldm: the original CompVis module names); repeatable (docs/maps.md; "
                             "default: none, names as they are)")
    if model_dir:
        parser.add_argument("--model-dir", type=Path, default=None, metavar="DIR",
                            help="the diffusers model folder built-in maps are generated from (default: the "
                                 "reference run's model_path)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="judge only reference tensors matching GLOB (component/invocation/name, or the name "
                             "alone; *, ** and ? as in docs/maps.md), e.g. 'unet/**'; repeatable; the verdict states "
                             "what was left out (default: all tensors)")
    parser.add_argument("--require", default="all", choices=REQUIRE,
                        help="what the candidate must provide: all tensors, blocks (block-level tensors only) or "
                             "pipeline (pipeline tensors only); tensors not required are compared when present and "
                             "listed when absent")


def naming_options(args) -> tuple[NameMap | None, Scope]:
    """The name map and scope the naming arguments ask for (bad ones are bad input)."""
    try:
        name_map = NameMap.load_all(args.map, model_dir=getattr(args, "model_dir", None)) if args.map else None
        return name_map, Scope(tuple(args.only), args.require)
    except (NameMapError, ScopeError) as exc:
        raise BadInput(str(exc)) from exc


def run(args) -> int:
    for label, path in (("REF", args.reference), ("CAND", args.candidate), ("--oracle", args.oracle),
                        ("--isolated", args.isolated), ("--block-oracle", args.block_oracle)):
        if path is not None and not path.exists():
            raise BadInput(f"{label} {path} does not exist")
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.candidate)
    _check_output_dir(args.output_dir)
    isolated_mode = None
    if args.isolated is not None:
        with open_run(args.isolated) as reader:  # a bad file is bad input before any work is done
            isolated_mode = reader.metadata.get("mode")
        if isolated_mode == "free":
            raise BadInput(f"--isolated {args.isolated} is a free-mode run (metadata mode=free); pass the "
                           "candidate run made in isolated mode")
    try:
        tolerances = Tolerances.load(args.config) if args.config is not None else Tolerances.discover(Path.cwd())
    except ToleranceConfigError as exc:
        raise BadInput(str(exc)) from exc
    name_map, scope = naming_options(args)
    baseline = load_baseline(args.baseline) if args.baseline is not None else None
    check_margin(args.baseline_margin)

    drawing = not args.quiet and on_terminal(sys.stderr)
    try:
        comparison = compare_runs(args.reference, args.candidate, oracle_path=args.oracle, name_map=name_map,
                                  tolerances=tolerances, progress=count_progress(drawing, "compare"), scope=scope)
        isolated = None
        if args.isolated is not None:
            oracles = [path for path in (args.block_oracle, args.oracle) if path is not None] or None
            isolated = compare_runs(args.reference, args.isolated, oracle_path=oracles, name_map=name_map,
                                    tolerances=tolerances, progress=count_progress(drawing, "compare isolated"),
                                    scope=scope)
            if isolated_mode is None:
                isolated.warnings.append(f"{args.isolated} does not record mode=isolated; treated as isolated")
    except (ToleranceConfigError, NameMapError) as exc:
        raise BadInput(str(exc)) from exc
    if comparison.mode == "isolated":
        comparison.warnings.append(f"{args.candidate} is an isolated-mode run; the first divergence of a free "
                                   "run is what locates accumulated error")

    verdict = make_verdict(comparison, isolated)
    summary = build_summary(comparison, verdict, isolated, config_source=tolerances.source)
    if baseline is not None:
        summary["baseline"] = compare_to_baseline(summary, baseline, args.baseline_margin)
    summary["command"] = compare_command(args)
    from sd_parity.reports.html.drilldown import add_drilldowns  # tensor data the HTML report drills into
    add_drilldowns(summary)
    written = render_outputs(summary, args.output_dir)
    print(format_table(summary, top=args.top, **table_options(sys.stdout)))
    report = next(p for p in written if p.suffix == ".html")
    print(printable(f"report: {report.resolve().as_uri()}"))
    print(printable("written: " + ", ".join(str(p) for p in written)))
    return summary["baseline"]["exit_code"] if baseline is not None else verdict.exit_code


def compare_command(args) -> str:
    """This comparison's command line, with absolute paths: it reproduces the summary from any folder."""
    def path(value: Path) -> str:
        return shlex.quote(str(Path(value).resolve()))

    parts = ["parity compare", path(args.reference), path(args.candidate)]
    parts += [f"--{option.replace('_', '-')} {path(getattr(args, option))}"
              for option in ("oracle", "block_oracle", "isolated", "config") if getattr(args, option) is not None]
    parts += [f"--map {path(spec) if Path(spec).exists() else shlex.quote(spec)}" for spec in args.map]
    if args.model_dir is not None:
        parts.append(f"--model-dir {path(args.model_dir)}")
    parts += [f"--only {shlex.quote(pattern)}" for pattern in args.only]
    if args.require != "all":
        parts.append(f"--require {args.require}")
    return " ".join(parts + [f"--output-dir {path(args.output_dir)}"])


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--output-dir {out} is a file; choose a folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise BadInput(f"--output-dir {out}: {probe} is not writable; choose another folder")
    if out.is_dir():  # refuse a FIFO or device in place of an output before any work, not after
        from sd_parity.reports.html import REPORT_FILE

        for name in (SUMMARY_FILE, DETAILS_FILE, JUNIT_FILE, REPORT_FILE):
            check_output_file(out / name, "--output-dir")


