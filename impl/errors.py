"""Errors impl/ raises for bad input (as opposed to bugs): callers show the message to the user as is."""


class ModelInputError(ValueError):
    """A model folder, checkpoint, config or argument that impl/ cannot use; the message says what to do."""
