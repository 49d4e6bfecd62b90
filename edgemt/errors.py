"""Error types that the CLI maps to exit codes.

A ``UserError`` is a problem with what the user gave us (a file, a field, a
value): the CLI prints its message without a traceback and exits with 2.
Anything else is a bug or an environment failure and exits with 1.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "TrainingDiverged"]


class UserError(Exception):
    """Bad input: the message names the file, field or value and what was expected."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe or option is invalid; the message carries the field path."""


class DataError(UserError):
    """A dataset file is missing, unreadable or malformed."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""

    exit_code = 1
