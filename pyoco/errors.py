"""The library's own error types for bad user input.

A ``raise InputError(...)`` says "the value, file or folder you gave is wrong" (the message names it); the
CLI prints it as one line and exits 2. A plain ``ValueError`` (a tensor of the wrong shape deep inside the
library) is a bug and is reported as an internal error, never as the user's mistake.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a setting, flag, file or folder; the message names it and says what is wrong."""
