"""The exception types that mean "the user's input is wrong": the CLI reports them and exits 2."""
from __future__ import annotations

from sd_parity.impl.errors import ModelInputError

from sd_parity.runs.selection import CaptureSpecError
from .fixtures import FixtureError
from sd_parity.runs.hdf5 import RunFileError


class BadInput(Exception):
    """Any other user error (bad size, missing folder, ...), raised with a message saying what to do."""


BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    BadInput, CaptureSpecError, FixtureError, RunFileError, ModelInputError,
)
