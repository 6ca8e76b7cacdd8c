"""The failure contract (docs/errors.md): typed exceptions for the Python API, exit codes for the CLI.

Every error sd-parity raises on purpose derives from SdParityError, so `except sd_parity.SdParityError`
catches them all. BadInput and its subclasses mean "the input or the environment is wrong, and the
message says what to change" (exit 2); anything else that escapes is an internal error (exit 3). This
module imports nothing of the package but impl's error type, so every module can derive its own error
types from these.
"""
from __future__ import annotations

import importlib.util
import signal

from sd_parity.impl.errors import ModelInputError

EXIT_PARITY = 0  # success, or a comparison at parity
EXIT_DIVERGENCE = 1  # a comparison that diverges (or misses reference tensors): nothing else exits 1
EXIT_BAD_INPUT = 2  # bad arguments, unreadable or invalid files, an output that cannot be written
EXIT_INTERNAL = 3  # no verdict: a bug, a failing candidate or library, or an interrupt (SIGINT/SIGTERM/SIGHUP)


class SdParityError(Exception):
    """Base of every error sd-parity raises on purpose."""


class BadInput(SdParityError):
    """The user's input or environment is wrong (a bad size, a missing folder, a corrupt file, a full
    disk, ...); the message says what was wrong and what to do."""


class OutputError(BadInput):
    """An output cannot be written: not a regular file, a read-only or full file system, no permission."""


class RunFileError(BadInput):
    """A run file that is missing, unreadable, incomplete, breaks the format or exceeds a limit."""


class MissingExtra(BadInput):
    """A feature needs packages of an extra that is not installed (torch, diffusers, transformers, ray)."""


REFERENCE_PACKAGES = ("torch", "diffusers", "transformers")


def require_extra(purpose: str, packages: tuple[str, ...] = REFERENCE_PACKAGES, extra: str = "reference") -> None:
    """Raise MissingExtra naming the extra to install when any of `packages` is not importable."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        torch_hint = (" (install a CPU build of torch first unless you want CUDA's, e.g. pip install torch==2.13.0)"
                      if "torch" in missing else "")
        raise MissingExtra(
            f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"install sd-parity[{extra}]: pip install 'sd-parity[{extra}]'{torch_hint}")


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP asked the process to stop. A KeyboardInterrupt, so no `except Exception`
    swallows it and every `finally` and context manager on the way out cleans up its temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


# impl/ is clean-room (it imports nothing of sd_parity), so its bad-input type cannot derive from BadInput.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (BadInput, ModelInputError)


def is_bad_input(exc: BaseException) -> bool:
    return isinstance(exc, BAD_INPUT_ERRORS)
