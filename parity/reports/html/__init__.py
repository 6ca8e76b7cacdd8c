"""HTML reports: one self-contained page per case (report.html) and an index over cases (parity.html).

`write_report(summary, path)` renders a summary (docs/summary-format.md, plus the drill-down data
of `drilldown.add_drilldowns`); `write_index_html(index, path)` renders `aggregate.index_dict`.
docs/report.md describes what the pages show.
"""
from __future__ import annotations

from .render import write_index as write_index_html
from .render import write_report

REPORT_FILE = "report.html"

__all__ = ["REPORT_FILE", "write_index_html", "write_report"]
