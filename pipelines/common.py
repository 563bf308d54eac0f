"""CLI plumbing shared by every pipelines module: one-line errors, exit codes, the console."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from pyoco.config import ConfigError

console = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 1


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


def cli_errors(fn: F) -> F:
    """Turn expected exceptions into a one-line error and a non-zero exit (set PYOCO_DEBUG=1 to re-raise)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except PyocoError as err:
            if os.environ.get("PYOCO_DEBUG"):
                raise
            fail(str(err), err.exit_code)
        except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
            if os.environ.get("PYOCO_DEBUG"):
                raise
            fail(str(err) or type(err).__name__, EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]
