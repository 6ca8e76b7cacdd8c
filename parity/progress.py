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

    `start(text)` names the phase the current case (`case(number)`) begins, which ends its phase before;
    `done(number, phases, line)` ends a finished case, however it ran (here, or in a worker process that
    announced nothing), and writes its line. Without a terminal no bar is drawn: each phase prints a
    `[case i/n] text` line instead (unless `lines` is off), which is what CI logs keep."""

    def __init__(self, total: int, cases: int, enabled: bool, lines: bool = True):
        self.drawing, self._lines = enabled, lines
        self._total, self._cases, self._case, self._bar = total, cases, 0, None
        self._started: dict[int, int] = {}  # phases each case has begun
        self._counted: dict[int, int] = {}  # phases of each case the bar has counted as done

    def case(self, number: int) -> None:
        self._case = number

    def start(self, text: str) -> None:
        if not self.drawing:
            if self._lines:
                print(f"[{self._case}/{self._cases}] {text}", file=sys.stderr, flush=True)
            return
        if self._started.get(self._case, 0) > self._counted.get(self._case, 0):
            self._advance(self._case, 1)
        self._started[self._case] = self._started.get(self._case, 0) + 1
        self._draw().set_description_str(f"[{self._case}/{self._cases}] {text}")

    def done(self, number: int, phases: int, line: str) -> None:
        """Case `number` has finished: all its `phases` are done; `line` (its result) goes to stdout."""
        if self.drawing:
            self._advance(number, phases - self._counted.get(number, 0))
            self._draw().write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def begin(self) -> None:
        """Show the bar now (its clock starts), before any phase or case reports."""
        if self.drawing:
            self._draw()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _advance(self, number: int, phases: int) -> None:
        self._counted[number] = self._counted.get(number, 0) + phases
        self._draw().update(phases)

    def _draw(self):
        if self._bar is None:
            self._bar = _bar(self._total, "parity", unit="phase",
                             bar_format="{desc} {n_fmt}/{total_fmt} phases [{elapsed}<{remaining}]")
        return self._bar
