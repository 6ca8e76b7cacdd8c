"""`parity report summary.json [--output report.html]`: re-render a case's HTML report from its summary.

Nothing is recomputed and no run file is opened: the summary holds the comparison and the
drill-down data. Exit 0 when written, 2 for a missing or invalid summary.
"""
from __future__ import annotations

import json
from pathlib import Path

from sd_parity.errors import BadInput
from ._options import add_parser, examples
from sd_parity.reports.summary import SCHEMA_VERSION

REQUIRED = ("verdict", "first_divergence", "culprits", "runs", "mode", "config", "coverage", "warnings", "blocks",
            "tensors", "isolated")


def register(subparsers) -> None:
    parser = add_parser(subparsers, "report", help="re-render the HTML report of a summary.json (no recomputing)",
                        description="Render the HTML report of a comparison from its summary.json (and the "
                                    "details file beside it), without the run files. Exit 0 written, 2 bad input.",
                        epilog=examples(("parity report reports/txt2img-ddim-numpy-fp32/summary.json",
                                         "writes report.html beside the summary and prints its file:// address")))
    parser.add_argument("summary", type=Path, metavar="summary.json", help="written by parity compare / parity run")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="where to write the report (default: report.html beside the summary)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from sd_parity.reports.html import REPORT_FILE, write_report

    summary = load_summary(args.summary)
    output = args.output or args.summary.parent / REPORT_FILE
    if output.is_dir():
        raise BadInput(f"--output {output} is a folder; give a file name such as {output / REPORT_FILE}")
    if not output.parent.is_dir():
        raise BadInput(f"--output {output}: folder {output.parent} does not exist")
    path = write_report(summary, output)
    print(path.resolve().as_uri())
    return 0


def load_summary(path: Path) -> dict:
    """The summary at `path`, or BadInput saying what is wrong with it."""
    if not path.is_file():
        raise BadInput(f"{path} does not exist or is not a file; give the summary.json that parity compare or "
                       "parity run wrote")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(summary, dict) or summary.get("schema_version") != SCHEMA_VERSION:
        found = summary.get("schema_version") if isinstance(summary, dict) else type(summary).__name__
        raise BadInput(f"{path} is not a summary.json of schema version {SCHEMA_VERSION} (found {found!r})")
    missing = [key for key in REQUIRED if key not in summary]
    if missing:
        raise BadInput(f"{path} lacks {', '.join(missing)}: not a complete summary.json")
    return summary
