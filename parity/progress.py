"""Terminal output: progress bars (tqdm, on stderr, only when it is a terminal) and whether to colour.

Every long phase shows one: denoising steps, the phases of `parity run` / `parity suite` (with an ETA
over all cases), fixture generation (bytes written) and comparisons (tensors compared). Piped or in
CI, nothing is drawn and the commands print their plain lines instead.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, TextIO


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def use_color(stream: TextIO) -> bool:
    """Colour on a terminal only, unless NO_COLOR is set (https://no-color.org); FORCE_COLOR forces it."""
    if os.environ.get("FORCE_COLOR"):
        return True
    return on_terminal(stream) and not os.environ.get("NO_COLOR")


def table_options(stream: TextIO) -> dict:
    """format_table's width and colour for `stream`: a terminal's width, or no limit (logs, pipes)."""
    width = shutil.get_terminal_size((120, 24)).columns if on_terminal(stream) else None
    return {"width": width, "color": use_color(stream)}


def _bar(total: int | None, label: str, **options):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True, **{"leave": False, **options})


def step_progress(enabled: bool, total: int, label: str) -> Callable[[int, int], None]:
    """A `progress(step, total)` callback drawing a bar of denoising steps (a no-op when not enabled)."""
    if not enabled:
        return lambda step, total: None
    bar = _bar(total, label, unit="step")

    def update(step: int, steps: int) -> None:
        bar.total = steps
        bar.update(1)
        if step == steps:
            bar.close()

    return update


def count_progress(enabled: bool, label: str, unit: str = "tensor") -> Callable[[int, int, str], None] | None:
    """A `progress(position, total, key)` callback (compare_runs) drawing a bar; None when not enabled."""
    if not enabled:
        return None
    bars = []

    def update(position: int, total: int, key: str) -> None:
        if not bars:
            bars.append(_bar(total, label, unit=unit))
        bar = bars[0]
        bar.update(position + 1 - bar.n)  # tqdm redraws at most every 0.1 s
        if position + 1 == total:
            bar.close()

    return update


def byte_progress(enabled: bool, total: int, label: str) -> Callable[[int], None]:
    """A `progress(nbytes)` callback counting bytes written toward `total` (a no-op when not enabled)."""
    if not enabled:
        return lambda nbytes: None
    bar = _bar(total, label, unit="B", unit_scale=True, unit_divisor=1024)

    def update(nbytes: int) -> None:
        bar.update(nbytes)
        if bar.n >= total:
            bar.close()

    return update


class Phases:
    """One bar over the phases of several cases (reference, oracle, candidate, compare, ...), with an ETA.

    `start(text)` finishes the phase before it and names the new one; without a terminal it prints
    `[case i/n] text` lines instead, which is what CI logs keep. The bar appears with the first phase
    started in this process: cases run by worker processes print their own lines."""

    def __init__(self, total: int, cases: int, enabled: bool):
        self.drawing = enabled
        self._total, self._cases, self._case, self._bar = total, cases, 0, None

    def case(self, number: int) -> None:
        self._case = number

    def start(self, text: str) -> None:
        if not self.drawing:
            print(f"[{self._case}/{self._cases}] {text}", file=sys.stderr, flush=True)
            return
        if self._bar is None:
            self._bar = _bar(self._total, "parity", unit="phase",
                             bar_format="{desc} {n_fmt}/{total_fmt} phases [{elapsed}<{remaining}]")
        else:
            self._bar.update(1)
        self._bar.set_description_str(f"[{self._case}/{self._cases}] {text}")

    def write(self, line: str) -> None:
        """A line to stdout that does not break the bar."""
        if self._bar is None:
            print(line, flush=True)
        else:
            self._bar.write(line, file=sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.close()
            self._bar = None
