"""Jinja2 rendering of the case report and the index, into one self-contained HTML file each.

Everything the page needs is inlined (scripts, styles, data, images), so it opens from file:// with
no network. Autoescaping is on for every template; data for the scripts goes into a JSON <script>
block with <, >, & and U+2028/U+2029 escaped, so no string from a run file can end the block.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from sd_parity.escaping import printable
from sd_parity.outputs import write_atomic
from .columns import table_columns
from .depth import depth_series
from .heatmap import step_heatmap
from .overview import located, overview
from .provenance import Provenance
from .values import as_float, rounded
from ..statuses import TENSORS, tone

_SCRIPT_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))
_CLOSERS = {".js": "</script", ".css": "</style"}
_SOURCE_MAP = ("//# sourceMappingURL", "/*# sourceMappingURL")
# the report's scripts, in load order: the plotting library, its heatmap plugin, the page's own code
REPORT_SCRIPTS = ("chart.umd.min.js", "chartjs-chart-matrix.min.js", "report.js")


def script_json(value: Any) -> Markup:
    """JSON safe inside <script type="application/json">: nothing in it can close the element.

    `value` is JSON-ready already (the page's data is built with values.rounded): walking a
    70,000-row blob through summary.jsonable would double the render time."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    for raw, escaped in _SCRIPT_ESCAPES:
        text = text.replace(raw, escaped)
    return Markup(text)


def inline_asset(name: str) -> Markup:
    """A static file's text for inlining, without its source-map comment (nothing to fetch offline)."""
    text = resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.startswith(_SOURCE_MAP))
    closer = _CLOSERS[Path(name).suffix]
    if closer in text.lower():
        raise ValueError(f"static/{name} contains {closer!r} and cannot be inlined")
    return Markup(text)


def shown(value: Any) -> str:
    """A number as the page prints it (5 significant digits, ∞ for infinity, - for none)."""
    number = rounded(value)
    if number is None:
        return "-"
    if isinstance(number, str):
        return {"Infinity": "∞", "-Infinity": "-∞"}.get(number, number)
    return f"{number:.5g}"


def full(value: Any) -> str:
    """A tensor element as the page prints it: every digit Python keeps, ∞/NaN for non-finite values."""
    number = as_float(value)
    if number is None:
        return "-"
    if math.isfinite(number):
        return repr(number)
    return "NaN" if math.isnan(number) else ("∞" if number > 0 else "-∞")


def scripts(names: tuple[str, ...]) -> dict[str, Any]:
    """Inline scripts and the CSP directive that lets exactly these run (by their SHA-256): an injected
    script would not run even if it got past escaping."""
    texts = [inline_asset(name) for name in names]
    hashes = [base64.b64encode(hashlib.sha256(t.encode("utf-8")).digest()).decode("ascii") for t in texts]
    csp = ("script-src " + " ".join(f"'sha256-{h}'" for h in hashes) + ";") if texts else ""
    return {"scripts": texts, "csp": csp}


def _shown_text(value: Any) -> Any:
    """Every value a template prints: names are data, so their non-printable characters show escaped."""
    return value if isinstance(value, Markup) or not isinstance(value, str) else printable(value)


_ENV = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          finalize=_shown_text)
_ENV.globals["asset"] = inline_asset
_ENV.globals["tone"] = tone
_ENV.filters["script_json"] = script_json
_ENV.filters["shown"] = shown
_ENV.filters["full"] = full


def render_report(summary: dict[str, Any]) -> str:
    isolated = summary.get("isolated")
    first = summary["first_divergence"]
    drill = summary.get("drilldowns")  # None: the summary was written without add_drilldowns
    provenance = Provenance(summary)
    tensors = [{**d, "provenance": provenance.of(d["source"], d["index"]),
                "row": located(_row(summary, d["source"], d["index"]))} for d in (drill or {}).get("tensors", [])]
    data = {
        "tables": {"free": table_columns(summary["tensors"]),
                   "isolated": table_columns(isolated["tensors"]) if isolated else None},
        "depth": depth_series(summary["tensors"], isolated["tensors"] if isolated else None,
                              first["index"] if first else None),
        "heatmap": step_heatmap(summary),
        "drilldowns": [{"id": _anchor(d["source"], d["index"]), "source": d["source"], "index": d["index"],
                        "spatial": d["spatial"], "channels": d["channels"], "histogram": d["histogram"]}
                       for d in tensors],
        "first": first["index"] if first else None,
        "tones": {status: tone(status) for status in {*TENSORS, *_statuses(summary)}},
        "levels": ((drill or {}).get("images") or {}).get("level_counts"),
    }
    return _ENV.get_template("report.html.j2").render(
        o=overview(summary), data=data, drilldowns=tensors, drill=drill, anchor=_anchor,
        drilled={(d["source"], d["index"]) for d in tensors}, created=summary.get("created"),
        **scripts(REPORT_SCRIPTS))


def render_index(index: dict[str, Any], folder: Path) -> str:
    cases = [{**case, "href": _href(case["report"], folder)} for case in index["cases"]]
    passed = sum(1 for case in cases if case["passed"])
    return _ENV.get_template("index.html.j2").render(index=index, cases=cases, passed=passed, **scripts(()))


def write_report(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    return write_atomic(path, render_report(summary))


def write_index(index: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    return write_atomic(path, render_index(index, path.parent))


def _statuses(summary: dict[str, Any]) -> set[str]:
    rows = summary["tensors"] + ((summary.get("isolated") or {}).get("tensors") or [])
    return {row["status"] for row in rows}


def _anchor(source: str, index: int) -> str:
    return f"dd-{source}-{index}"


def _row(summary: dict[str, Any], source: str, index: int) -> dict[str, Any]:
    return (summary["tensors"] if source == "free" else summary["isolated"]["tensors"])[index]


def _href(report: str, folder: Path) -> str:
    """The case report's URL relative to the index, so the folder can be moved or archived whole."""
    relative = os.path.relpath(Path(report).resolve(), folder.resolve())
    return quote(Path(relative).as_posix())
