"""The exception types sd-parity raises on purpose, and which of them mean "the user's input is wrong".

Every error of the harness derives from SdParityError (run files, capture specs, fixtures, name maps,
tolerance configs, assert_parity), so `except sd_parity.SdParityError` catches them all. The CLI
reports the bad-input ones (BAD_INPUT_ERRORS) and exits 2. This module imports nothing of the
harness: the modules that define the other error types import it.
"""
from __future__ import annotations

import importlib.util


class SdParityError(Exception):
    """Base of every error sd-parity raises on purpose."""


class BadInput(SdParityError):
    """Any other user error (bad size, missing folder, ...), raised with a message saying what to do."""


class MissingExtra(BadInput):
    """A feature needs packages of an extra that is not installed (torch, diffusers, transformers)."""


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


def __getattr__(name: str):
    # Built on first use: the error types live with their modules, and those modules import this one.
    if name == "BAD_INPUT_ERRORS":
        from sd_parity.fixtures import FixtureError
        from sd_parity.impl.errors import ModelInputError
        from sd_parity.runs.hdf5 import RunFileError
        from sd_parity.runs.selection import CaptureSpecError

        return (BadInput, CaptureSpecError, FixtureError, RunFileError, ModelInputError)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
