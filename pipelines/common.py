"""CLI plumbing shared by every pipelines module: one-line errors, exit codes, the console."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import typer
from rich.console import Console

from pyoco.errors import InputError

console = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 1
EXIT_INTERNAL = 1


class PyocoError(RuntimeError):
    """An expected failure with a message fit for a user (no traceback). ``exit_code`` is the CLI status."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
    """Print ``error: message`` on one line to stderr and exit."""
    first = " ".join(str(message).split())
    console.print(
        f"[bold red]error:[/] {first}", soft_wrap=True, markup=True
    ) if sys.stderr.isatty() else print(f"error: {first}", file=sys.stderr)
    raise typer.Exit(exit_code)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """What counts as the user's mistake: our own input errors (``InputError``: ``ConfigError``,
    ``DataError``, ``VideoDecodeError``...), pydantic validation of a config, and a path the user named
    that is missing or unreadable. Anything else is a bug (see :func:`cli_errors`)."""
    from pydantic import ValidationError

    return (InputError, ValidationError, FileNotFoundError, NotADirectoryError, PermissionError)


def cli_errors(fn: F) -> F:
    """Turn exceptions into a one-line error and a non-zero exit (set PYOCO_DEBUG=1 to re-raise).

    ``PyocoError``: its message and exit code. Bad input (:func:`_user_error_types`): exit 2. Any other
    exception is an internal error, exit 1, so that a bug is never presented as a user mistake.
    Typer/click usage errors never reach here (click reports them itself, exit 2).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit, click.exceptions.ClickException):
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as err:  # noqa: BLE001 - sorted into user / internal errors below
            if os.environ.get("PYOCO_DEBUG"):
                raise
            if isinstance(err, PyocoError):
                fail(str(err), err.exit_code)
            if isinstance(err, _user_error_types()):
                fail(str(err) or type(err).__name__, EXIT_BAD_INPUT)
            fail(
                f"internal error (a bug in pyoco, not your input): {type(err).__name__}: {err}"[:500]
                + "; rerun with PYOCO_DEBUG=1 to see the traceback",
                EXIT_INTERNAL,
            )

    return wrapper  # type: ignore[return-value]
