"""The two kinds of error a person gets as one line instead of a traceback (the CLI's exit codes).

* ``UserError`` (exit 2): the input is wrong (a config field, a missing or damaged file, a
  checkpoint that is not trusted); the message names the field or the file.
* ``RunFailure`` (exit 1): the input was fine but the run could not go on (training diverged, a
  save failed, a peer was lost, another trainer holds the run); the message says what to do.

Any other exception is a bug in megasmol and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, named in the message: exit code 2."""

    exit_code = 2


class InputError(UserError, ValueError):
    """A wrong value a person gave (a command-line argument, an environment variable) that is not
    a config field: exit code 2. A ``ValueError`` too, so code that catches one still does."""


class OutputExists(UserError, FileExistsError):
    """An output location that is taken (a non-empty folder without ``--overwrite``, a file where
    a folder should be, a checkpoint that would be written into): exit code 2."""


class RunFailure(Exception):
    """A run that could not go on, said in one line: exit code 1. ``reported``: the line was
    already printed (by the rank that saw it first)."""

    exit_code = 1
    reported = False
