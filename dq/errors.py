"""The errors a user can act on, apart from programming errors.

`UserError` marks a mistake the user can fix: a config value out of range, a missing or corrupt file, a
checkpoint, state or step count that does not match the run. Its message names the value or file and what
to do. The command-line entries (`dq.cli`) print it as one line, `dq: error: <message>`, and exit with
code 2; any other exception is a programming error and keeps its traceback.

`UserError` subclasses ValueError (and `MissingFileError` FileNotFoundError too), so code that caught
those before still catches them.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave dq (config, files, checkpoints); the message says what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a run needs) does not exist."""


class CorruptFileError(UserError):
    """A file exists but cannot be read as what it claims to be (truncated, bytes flipped, another format)."""


class MismatchError(UserError):
    """Two things that must agree do not: a checkpoint and the run's config, a state file and a model."""


class UnsupportedError(UserError, NotImplementedError):
    """A model, checkpoint or option dq does not handle (yet); the message says which part."""


class MissingPackageError(UserError, ImportError):
    """A package a model's folder needs is not installed; the message says what to pip install."""


class OutputExistsError(UserError, FileExistsError):
    """An output path that exists and would be overwritten without the overwrite switch."""
