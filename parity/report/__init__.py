"""HTML reports (placeholder until the report renderer lands: a plain index so `make parity` links something)."""
from __future__ import annotations

import html
from pathlib import Path


def write_index_html(index: dict, path: Path) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{html.escape(c['status'])}</td><td>{html.escape(c['verdict'])}</td></tr>"
        for c in index["cases"])
    path.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(index['title'])}</title>"
                    f"<h1>{html.escape(index['title'])}</h1><table>{rows}</table>")
    return path
