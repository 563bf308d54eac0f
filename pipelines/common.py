"""CLI plumbing shared by every pipelines module: one-line errors, exit codes, the console, progress lines."""

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


STORAGE_CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "aiohttp", "urllib3")


def _unreachable_storage(err: BaseException) -> bool:
    """A connection error or timeout of the storage client (S3 endpoint down, network): the environment's,
    not a bug. Other timeouts (Ray's ``GetTimeoutError`` is a ``TimeoutError`` too) stay internal."""
    from pyoco import storage

    chain, link = [], err
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    from_client = any(type(e).__module__.split(".")[0] in STORAGE_CLIENT_MODULES for e in chain)
    return from_client and storage.is_transient(err)


def cli_errors(fn: F) -> F:
    """Turn exceptions into a one-line error and a non-zero exit (set PYOCO_DEBUG=1 to re-raise).

    ``PyocoError``: its message and exit code. Bad input (:func:`_user_error_types`): exit 2. Storage that
    cannot be reached (connection errors, timeouts: :func:`pyoco.storage.is_transient`): exit 1, said so.
    Any other exception is an internal error, exit 1, so that a bug is never presented as a user mistake.
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
            if _unreachable_storage(err):
                fail(
                    f"storage unreachable: {type(err).__name__}: {err}"[:500]
                    + " (check AWS_ENDPOINT_URL / the network; transient errors were retried)",
                    EXIT_INTERNAL,
                )
            fail(
                f"internal error (a bug in pyoco, not your input): {type(err).__name__}: {err}"[:500]
                + "; rerun with PYOCO_DEBUG=1 to see the traceback",
                EXIT_INTERNAL,
            )

    return wrapper  # type: ignore[return-value]


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class ProgressLine:
    """One live line for long work: ``label  done/total unit  rate  ETA  extra`` (a rich bar on a terminal).

    On a non-terminal (CI, a log file) a bar would print a line per refresh, so it prints at most two
    milestone lines instead: half way and done. ``per_item=True`` shows seconds per item (``s/step``)
    rather than items per second. The rate is measured from the start (``with``), or with
    ``from_first_update=True`` from the first update, so that start-up time (Ray workers, model loading)
    does not skew a training ETA.

        with ProgressLine("train", total=200, unit="step", per_item=True) as bar:
            bar.update(10, loss=0.31)
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str,
        per_item: bool = False,
        from_first_update: bool = False,
        out=None,
    ):
        import time

        self._clock = time.monotonic
        self.label, self.total, self.unit, self.per_item = label, total, unit, per_item
        self.console = out or console
        self.done = 0
        self._first: tuple[float, int] | None = None
        self.from_first_update = from_first_update
        self._fields: dict[str, Any] = {}
        self._milestones = [0.5, 1.0]
        self._bar = None

    def __enter__(self) -> ProgressLine:
        if not self.from_first_update:
            self._first = (self._clock(), 0)
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("  {task.description}"),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self._task = self._bar.add_task(self.label, total=self.total, info="")
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def info(self) -> str:
        """``12/200 steps, 0.41 s/step, ETA 1:17, loss 0.312``."""
        parts = [f"{self.done}/{self.total if self.total is not None else '?'} {self.unit}s"]
        if self._first is not None and self.done > self._first[1]:
            rate = (self.done - self._first[1]) / max(1e-9, self._clock() - self._first[0])
            parts.append(f"{1 / rate:.2f} s/{self.unit}" if self.per_item else f"{rate:.1f} {self.unit}s/s")
            if self.total is not None and self.total > self.done:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self._fields.items()]
        return ", ".join(parts)

    def update(self, done: int, total: int | None = None, **fields: Any) -> None:
        if total is not None:
            self.total = total
        if self._first is None:
            self._first = (self._clock(), done)
        self.done = done
        self._fields.update({k: v for k, v in fields.items() if v is not None})
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, info=self.info())
            return
        crossed = False
        while self.total and self._milestones and done >= self._milestones[0] * self.total:
            self._milestones.pop(0)
            crossed = True
        if crossed:
            self.console.print(f"  {self.label}: {self.info()}", soft_wrap=True, markup=False)
