"""`parity report summary.json [--output report.html]`: re-render a case's HTML report from its summary.

Nothing is recomputed and no run file is opened: summary.json and details.json.gz beside it hold the
comparison and the drill-down data. Exit 0 when written, 2 for a missing or invalid summary.
"""
from __future__ import annotations

from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.reports.summary import load_summary
from ._options import add_parser, examples


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
