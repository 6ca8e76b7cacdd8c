"""`parity align REF.h5 CAND.h5 --write-map map.toml`: propose a name map for a run with unknown names.

Pairs the candidate's tensors with the reference's by execution order, shape and values
(sd_parity.judging.align), writes the map and prints what it placed and what it could not.
Exit 0 when the map is written; 2 on bad input. The map is a proposal: check it with
`parity compare REF CAND --map map.toml`.
"""
from __future__ import annotations

import json
from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.judging.align import align_runs, write_map
from sd_parity.outputs import write_atomic
from ._options import add_parser, examples

SHOWN = 12  # not-placed names listed per component on the terminal (the map lists them all)


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "align", help="propose a name map for a candidate run with other names (by execution order, shape, values)",
        description="Pair CAND's tensors with REF's by execution order and shape, ties broken by value, and write "
                    "the name map that makes `parity compare` line them up; list what could not be placed.",
        epilog=examples(("parity align ref.h5 port.h5 --write-map port.toml",
                         "then check it: parity compare ref.h5 port.h5 --map port.toml")))
    parser.add_argument("reference", type=Path, metavar="REF.h5", help="the reference run file")
    parser.add_argument("candidate", type=Path, metavar="CAND.h5", help="the candidate run file")
    parser.add_argument("--write-map", type=Path, required=True, metavar="MAP.toml", help="where to write the map")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write what was placed and not placed, per component, as JSON (default: none)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    for label, path in (("REF.h5", args.reference), ("CAND.h5", args.candidate)):
        if not path.is_file():
            raise BadInput(f"{label} {path} does not exist or is not a file")
    for path in (args.write_map, args.json):
        if path is not None and not (path.parent if str(path.parent) else Path(".")).is_dir():
            raise BadInput(f"{path}: folder {path.parent} does not exist; create it or choose another path")
    alignment = align_runs(args.reference, args.candidate)
    write_atomic(args.write_map, write_map(alignment, f"{args.reference.name} and {args.candidate.name}"))
    if args.json is not None:
        write_atomic(args.json, json.dumps(alignment.to_dict(), indent=1) + "\n")
    for part in alignment.components:
        placed, total = part.block_level()
        print(f"{part.component} ({part.invocation}): placed {len(part.placed)} of {len(part.ref_names)} reference "
              f"tensors; block level {placed} of {total} ({100 * placed / max(total, 1):.1f}%)")
        for kind, names in (("reference", part.unplaced_ref), ("candidate", part.unplaced_cand)):
            if names:
                shown = ", ".join(names[:SHOWN]) + (f" ... (+{len(names) - SHOWN})" if len(names) > SHOWN else "")
                print(f"  not placed ({kind}, {len(names)}): {shown}")
    for component in alignment.missing_components:
        print(f"{component}: the candidate has no tensors of this component")
    print(f"written: {args.write_map}" + (f", {args.json}" if args.json else ""))
    return 0

