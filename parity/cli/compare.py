"""`parity compare REF.h5 CAND.h5 --output-dir DIR`: tensor-by-tensor comparison of two run files.

Writes DIR/summary.json and DIR/junit.xml (and whatever summary.render_outputs adds), prints the
verdict and the worst tensors. Exit 0: parity; 1: divergence (or reference tensors missing);
2: bad input (unreadable run file, bad name map, bad tolerance config, unwritable output folder).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.name_map import NameMap, NameMapError
from sd_parity.runs.hdf5 import RunReader
from sd_parity.reports.summary import build_summary, format_table, render_outputs
from sd_parity.judging.tolerances import ToleranceConfigError, Tolerances
from sd_parity.judging.verdict import make_verdict


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare a candidate run file with the reference run file, tensor by tensor",
        description="Compare CAND.h5 with REF.h5 in the reference's execution order; write summary.json and "
                    "junit.xml into --output-dir. Exit 0 parity, 1 divergence, 2 bad input.")
    parser.add_argument("reference", type=Path, metavar="REF.h5", help="the reference run file")
    parser.add_argument("candidate", type=Path, metavar="CAND.h5", help="the candidate run file (free mode)")
    parser.add_argument("--map", type=Path, metavar="NAMES.toml",
                        help="name map from the candidate's tensor names to the reference's")
    parser.add_argument("--oracle", type=Path, metavar="ORACLE.h5",
                        help="an fp64 run of the reference: thresholds calibrated on the reference's own error")
    parser.add_argument("--isolated", type=Path, metavar="ISO_CAND.h5",
                        help="the candidate run in isolated mode, to name culprit blocks")
    parser.add_argument("--block-oracle", type=Path, metavar="BLOCKS.h5",
                        help="the block-local fp64 oracle of REF.h5 (parity capture --block-oracle REF.h5): "
                             "calibrates the isolated comparison, ahead of --oracle")
    parser.add_argument("--config", type=Path, metavar="parity.toml",
                        help="tolerance settings and overrides (a parity.toml, or a pyproject.toml with "
                             "[tool.parity]); default: ./parity.toml, else ./pyproject.toml's [tool.parity]")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="DIR",
                        help="folder for summary.json and junit.xml (created if missing)")
    parser.add_argument("--top", type=int, default=10, help="how many tensors the table lists (default 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=run)


def run(args) -> int:
    for label, path in (("REF.h5", args.reference), ("CAND.h5", args.candidate), ("--oracle", args.oracle),
                        ("--isolated", args.isolated), ("--block-oracle", args.block_oracle)):
        if path is not None and not path.is_file():
            raise BadInput(f"{label} {path} does not exist or is not a file")
    _check_output_dir(args.output_dir)
    isolated_mode = None
    if args.isolated is not None:
        with RunReader(args.isolated) as reader:  # a bad file is bad input before any work is done
            isolated_mode = reader.metadata.get("mode")
        if isolated_mode == "free":
            raise BadInput(f"--isolated {args.isolated} is a free-mode run (metadata mode=free); pass the "
                           "candidate run made in isolated mode")
    try:
        tolerances = Tolerances.load(args.config) if args.config is not None else Tolerances.discover(Path.cwd())
        name_map = NameMap.load(args.map) if args.map is not None else None
    except (ToleranceConfigError, NameMapError) as exc:
        raise BadInput(str(exc)) from exc

    progress = None if args.quiet or not sys.stderr.isatty() else _progress
    try:
        comparison = compare_runs(args.reference, args.candidate, oracle_path=args.oracle, name_map=name_map,
                                  tolerances=tolerances, progress=progress)
        isolated = None
        if args.isolated is not None:
            oracles = [path for path in (args.block_oracle, args.oracle) if path is not None] or None
            isolated = compare_runs(args.reference, args.isolated, oracle_path=oracles, name_map=name_map,
                                    tolerances=tolerances, progress=progress)
            if isolated_mode is None:
                isolated.warnings.append(f"{args.isolated} does not record mode=isolated; treated as isolated")
    except (ToleranceConfigError, NameMapError) as exc:
        raise BadInput(str(exc)) from exc
    finally:
        if progress is not None:
            print("\r\033[K", end="", file=sys.stderr)
    if comparison.mode == "isolated":
        comparison.warnings.append(f"{args.candidate} is an isolated-mode run; the first divergence of a free "
                                   "run is what locates accumulated error")

    verdict = make_verdict(comparison, isolated)
    summary = build_summary(comparison, verdict, isolated, config_source=tolerances.source)
    from sd_parity.reports.html.drilldown import add_drilldowns  # tensor data the HTML report drills into
    add_drilldowns(summary)
    written = render_outputs(summary, args.output_dir)
    print(format_table(summary, top=args.top))
    print("written: " + ", ".join(str(p) for p in written))
    return verdict.exit_code


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--output-dir {out} is a file; choose a folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise BadInput(f"--output-dir {out}: {probe} is not writable; choose another folder")


def _progress(position: int, total: int, key: str) -> None:
    if position % 25 == 0 or position == total - 1:
        print(f"\rcomparing {position + 1}/{total} {key[:80]}\033[K", end="", file=sys.stderr, flush=True)
