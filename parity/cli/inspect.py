"""`parity inspect RUN`: what a run (HDF5 file or run folder) holds (components, steps, tensors, sizes,
metadata; values with --stats), as text or --json; `parity validate RUN`: check it against the format."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sd_parity.errors import EXIT_BAD_INPUT, BadInput
from sd_parity.escaping import printable
from sd_parity.judging.scope import Scope, ScopeError
from sd_parity.reports.summary import jsonable
from sd_parity.runs.open import open_run, validate_run
from ._options import add_parser, examples

SHOWN_PER_INVOCATION = 3  # tensors listed per invocation without --tensors, --filter or --stats


def say(line: str) -> None:
    """Print one line whose names come from the run file (escaped: it stays one line)."""
    print(printable(line))


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "inspect", help="list the components, steps, tensors and metadata of a run (file or folder)",
        description="List what a run holds: its metadata, components, invocations (steps, calls) and tensors with "
                    "dtypes, shapes and sizes; with --stats, each tensor's values (like polygraphy inspect data "
                    "--show-values).",
        epilog=examples(("parity inspect ref.h5", "a summary per component and invocation"),
                        ("parity inspect ref.h5 --filter 'unet/step_000/down_blocks.1*' --stats",
                         "min, max, mean, std and NaN/Inf counts of one block's tensors at step 0"),
                        ("parity inspect ref.h5 --json | jq '.tensors[].key'", "machine-readable")))
    parser.add_argument("run", type=Path, metavar="RUN", help="a run: .h5 file or run folder")
    parser.add_argument("--tensors", action="store_true",
                        help=f"list every tensor (default: the first {SHOWN_PER_INVOCATION} per invocation)")
    parser.add_argument("--filter", action="append", default=[], metavar="GLOB",
                        help="only tensors matching GLOB: component/invocation/name with a '/', else the name alone "
                             "(*, ** and ? as in docs/maps.md; brackets are literal); repeatable (default: all)")
    parser.add_argument("--stats", action="store_true",
                        help="read every listed tensor and show min, max, mean, std and NaN/Inf counts")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.set_defaults(handler=run)

    check = add_parser(subparsers, "validate",
                       help="check a run (file or folder) against the format and name every problem",
                       description="Check a run file or run folder against the run format (docs/run-format.md) "
                                   "and list every problem. Exit 0 valid, 2 invalid.",
                       epilog=examples(("parity validate port.h5", "before comparing a run written by a port")))
    check.add_argument("run", type=Path, metavar="RUN", help="a run: .h5 file or run folder")
    check.set_defaults(handler=run_validate)


def size_text(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def tensor_stats(array: np.ndarray) -> dict[str, Any]:
    """min, max, mean and std over the finite elements; NaN and Inf counts; None where nothing is finite."""
    values = np.asarray(array)
    if values.dtype.kind not in "fc":
        values = values.astype(np.float64)
    values = values.astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None,
                             "nan": int(np.isnan(values).sum()), "inf": int(np.isinf(values).sum())}
    if finite.size:
        stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
                     std=float(finite.std()))
    return stats


def run(args) -> int:
    try:
        scope = Scope(tuple(args.filter))
    except ScopeError as exc:
        raise BadInput(str(exc).replace("--only", "--filter")) from exc
    with open_run(args.run) as reader:
        entries = [e for e in reader.entries() if scope.selects(e.key)]
        if args.filter and not entries:
            raise BadInput(f"--filter {' '.join(args.filter)} matches none of the {len(reader.entries())} tensors of "
                           f"{args.run}; patterns with a '/' match component/invocation/name, others the name alone")
        stats = {e.key: tensor_stats(reader.read(e)) for e in entries} if args.stats else {}
        if args.json:
            print(json.dumps(jsonable(_document(args.run, reader.metadata, entries, stats)), allow_nan=False))
        else:
            _print_text(args, reader, entries, stats)
    return 0


def _document(path: Path, metadata: dict, entries: list, stats: dict) -> dict[str, Any]:
    return {"run": str(path), "metadata": metadata,
            "tensors": [{"key": e.key, "component": e.component, "invocation": e.invocation, "name": e.name,
                         "order": e.order, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes, "kind": e.kind,
                         **({"stats": stats[e.key]} if e.key in stats else {})} for e in entries],
            "total": {"tensors": len(entries), "bytes": sum(e.nbytes for e in entries)}}


def _print_text(args, reader, entries: list, stats: dict) -> None:
    meta = reader.metadata
    say(f"{args.run}: impl={meta.get('impl')} model={meta.get('model')} dtype={meta.get('dtype')} "
        f"scheduler={meta.get('scheduler')} steps={meta.get('steps')} seed={meta.get('seed')} "
        f"size={meta.get('width')}x{meta.get('height')}")
    say("metadata: " + json.dumps(meta, sort_keys=True))
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for entry in entries:
        groups[(entry.component, entry.invocation)].append(entry)
    every = args.tensors or bool(args.filter) or args.stats
    for component in reader.components():
        invocations = [inv for (comp, inv) in groups if comp == component]
        if not invocations:
            continue
        count = sum(len(groups[(component, inv)]) for inv in invocations)
        nbytes = sum(e.nbytes for inv in invocations for e in groups[(component, inv)])
        print()
        say(f"{component}: {len(invocations)} invocation(s), {count} tensors, {size_text(nbytes)}")
        for invocation in sorted(invocations):
            listed = groups[(component, invocation)]
            say(f"  {invocation}: {len(listed)} tensors, {size_text(sum(e.nbytes for e in listed))}")
            shown = listed if every else listed[:SHOWN_PER_INVOCATION]
            for entry in shown:
                line = f"    {entry.name}  {entry.dtype}{list(entry.shape)}  {size_text(entry.nbytes)}"
                say(line + (f"  {_stats_text(stats[entry.key])}" if entry.key in stats else ""))
            if len(shown) < len(listed):
                say(f"    ... {len(listed) - len(shown)} more (--tensors lists all)")
    print()
    say(f"total: {len(entries)} tensors, {size_text(sum(e.nbytes for e in entries))}"
        + (f" (of {len(reader.entries())}; --filter {' '.join(args.filter)})" if args.filter else ""))


def _stats_text(stats: dict[str, Any]) -> str:
    text = " ".join(f"{name} {_number(stats[name])}" for name in ("min", "max", "mean", "std"))
    return text + "".join(f" {name}={stats[name]}" for name in ("nan", "inf") if stats[name])


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.6g}"


def run_validate(args) -> int:
    problems = validate_run(args.run)
    if problems:
        for problem in problems:
            say(f"{args.run}: {problem}")
        return EXIT_BAD_INPUT
    say(f"{args.run}: valid run {'folder' if args.run.is_dir() else 'file'}")
    return 0
