"""SIGINT, SIGTERM and SIGHUP as exceptions, so that an interrupted command cleans up on its way out.

A CI timeout sends SIGTERM, a closed terminal SIGHUP, Ctrl-C SIGINT. `handled()` turns each into an
`Interrupted` exception raised in the main thread: every `finally` and context manager on the way
out runs (run-file writers discard their temporary files, output sets are never half-swapped) and
the command line exits 3 (docs/errors.md). A second signal while the first is being handled is
ignored, so the cleanup itself is not cut short; `critical()` defers a signal until a short section
that must not be cut in half (renaming a set of outputs into place) has finished.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from sd_parity.errors import Interrupted

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

_state = {"depth": 0, "pending": None, "raised": False}


def _handler(signum, frame) -> None:
    if _state["raised"]:
        return  # already on the way out: let the cleanup finish
    if _state["depth"]:
        _state["pending"] = signum
        return
    _state["raised"] = True
    raise Interrupted(signum)


@contextmanager
def handled() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise Interrupted (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.update(pending=None, raised=False)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def critical() -> Iterator[None]:
    """A section a signal must not cut in half: a signal arriving inside is raised when it ends."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending = _state["pending"]
        if not _state["depth"] and pending is not None:
            _state["pending"] = None
            _state["raised"] = True
            raise Interrupted(pending)
