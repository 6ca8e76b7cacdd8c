"""SIGINT, SIGTERM and SIGHUP: remove every temporary file, say so, and exit 3.

A CI timeout sends SIGTERM, a closed terminal SIGHUP, Ctrl-C SIGINT. A signal can arrive anywhere,
also inside HDF5 or a lock of a writer thread, where unwinding with an exception can leave a lock
held and the process hung; so within `handled()` the handler does not unwind: it removes the
temporaries that sd_parity.outputs keeps a registry of (run files being written, outputs being
staged) and leaves at once with exit 3 (docs/errors.md). `critical()` defers a signal until a short
section that must not be cut in half (renaming a set of outputs into place) has finished, and then
raises `Interrupted` at that safe point, so the caller unwinds normally.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from sd_parity.errors import EXIT_INTERNAL, Interrupted

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

_state: dict = {"depth": 0, "pending": None, "label": "parity"}


def message(signum: int, label: str | None = None) -> str:
    return (f"{label or _state['label']}: interrupted by {signal.Signals(signum).name}; temporary files were "
            f"removed, no verdict (exit {EXIT_INTERNAL})")


def _handler(signum, frame) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    from sd_parity.outputs import remove_temporaries

    remove_temporaries()
    try:
        os.write(2, (message(signum) + "\n").encode())
    finally:
        os._exit(EXIT_INTERNAL)


def set_label(label: str) -> None:
    """How the exit message names the command (e.g. "parity compare")."""
    _state["label"] = label


@contextmanager
def handled() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP clean up and exit 3 (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.update(pending=None, depth=0)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def default_handlers() -> None:
    """The operating system's handling again (for a forked helper process, which has nothing to clean up)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


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
            raise Interrupted(pending)
