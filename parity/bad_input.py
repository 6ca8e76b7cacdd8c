"""The exception types that mean "the user's input is wrong": the CLI reports them and exits 2."""
from __future__ import annotations

from impl.errors import ModelInputError

from .capture_spec import CaptureSpecError
from .fixtures import FixtureError
from .runfile import RunFileError


class BadInput(Exception):
    """Any other user error (bad size, missing folder, ...), raised with a message saying what to do."""


BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    BadInput, CaptureSpecError, FixtureError, RunFileError, ModelInputError,
)
