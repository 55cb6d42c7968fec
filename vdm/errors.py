"""The one error type for what a user got wrong: a bad key or value, a missing file, a refused input.

The entry points (train.py, sample.py, the `python -m vdm...` commands) print a `UserError` as one line,
`error: <message>`, and exit 2; any other exception is a bug and keeps its traceback. The subclasses are also
the built-in error they stand for, so `except ValueError` (and `pytest.raises(ValueError)`) still catch them.
"""


class UserError(Exception):
    """Something the user gave that vdm refuses; the message is one line naming the key or file and what
    would be valid."""


class BadInput(UserError, ValueError):
    """A key, value, prompt, model or file content that cannot be used."""


class NotFound(UserError, FileNotFoundError):
    """A file or folder the user named that does not exist."""


class AlreadyExists(UserError, FileExistsError):
    """Work that would be overwritten (an output, a run folder with checkpoints)."""
