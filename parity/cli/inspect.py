"""`parity inspect RUN`: what a run (HDF5 file or run folder) holds (components, steps, tensors, sizes, metadata)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from sd_parity.errors import EXIT_BAD_INPUT
from sd_parity.escaping import printable
from sd_parity.runs.open import open_run, validate_run


def say(line: str) -> None:
    """Print one line whose names come from the run file (escaped: it stays one line)."""
    print(printable(line))


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="list the components, steps, tensors and metadata of a run (file or folder)")
    parser.add_argument("run", type=Path)
    parser.add_argument("--tensors", action="store_true", help="list every tensor, not only a summary per invocation")
    parser.set_defaults(handler=run)

    check = subparsers.add_parser("validate", help="check a run (file or folder) against the format and name every problem")
    check.add_argument("run", type=Path)
    check.set_defaults(handler=run_validate)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def run(args) -> int:
    with open_run(args.run) as reader:
        meta = reader.metadata
        say(f"{args.run}: impl={meta.get('impl')} model={meta.get('model')} dtype={meta.get('dtype')} "
            f"scheduler={meta.get('scheduler')} steps={meta.get('steps')} seed={meta.get('seed')}")
        say("metadata: " + json.dumps(meta, sort_keys=True))
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for entry in reader.entries():
            groups[(entry.component, entry.invocation)].append(entry)
        total = 0
        for component in reader.components():
            invocations = [inv for (comp, inv) in groups if comp == component]
            count = sum(len(groups[(component, inv)]) for inv in invocations)
            nbytes = sum(e.nbytes for inv in invocations for e in groups[(component, inv)])
            total += nbytes
            print()
            say(f"{component}: {len(invocations)} invocation(s), {count} tensors, {_size(nbytes)}")
            for invocation in sorted(invocations):
                entries = groups[(component, invocation)]
                say(f"  {invocation}: {len(entries)} tensors, {_size(sum(e.nbytes for e in entries))}")
                shown = entries if args.tensors else entries[:3]
                for entry in shown:
                    say(f"    {entry.name}  {entry.dtype}{list(entry.shape)}  {_size(entry.nbytes)}")
                if len(shown) < len(entries):
                    say(f"    ... {len(entries) - len(shown)} more (--tensors lists all)")
        print()
        say(f"total: {len(reader.entries())} tensors, {_size(total)}")
    return 0


def run_validate(args) -> int:
    problems = validate_run(args.run)
    if problems:
        for problem in problems:
            say(f"{args.run}: {problem}")
        return EXIT_BAD_INPUT
    say(f"{args.run}: valid run {'folder' if args.run.is_dir() else 'file'}")
    return 0
