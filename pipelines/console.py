"""The console of a ``pyoco run``: its own output, and where Ray's, MLflow's and DeepSpeed's go.

Inside :func:`quiet_logs` (every ``pyoco run`` without ``-v``) the loggers of Ray, Ray Data/Train,
MLflow, alembic, urllib3 and DeepSpeed write to ``RunContext.log_file`` instead of the console, and so do the
lines that Ray forwards from its worker, actor and controller processes; every line is scrubbed of secrets
first (:func:`pipelines.tracking.scrub`). Training progress reaches the driver through ``ray.train.report``
(:class:`TrainProgress`), never through worker prints.

Native code that writes to file descriptor 2 itself (the C++ core worker that Ray runs inside this process:
``core_worker.cc`` lines; gloo) bypasses every logger, so quiet_logs also points fd 2 at the log file, and
``sys.stderr`` (pyoco's console) at a copy of the terminal's descriptor.

:func:`pipelines.context.ensure_ray` calls :func:`route_logs` and :func:`route_ray_output` around
``ray.init`` (``import ray`` gives the ray logger a console handler of its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.context import RunContext

NOISY_LOGGERS = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray.serve",
    "mlflow",
    "alembic",
    "urllib3",
    "DeepSpeed",
    "deepspeed",
    "filelock",
    "py.warnings",
    "diffusers",
    "transformers",
    "sentence_transformers",
    "huggingface_hub",
    "torch.distributed",
)
_log_handler: logging.Handler | None = None  # set while quiet_logs is active
_saved_loggers: dict[str, tuple[list[logging.Handler], bool]] = {}
_RAY_HANDLER = "pyoco_log_file"
_saved_data_bars: bool | None = None
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # MLflow prints "View run ... at: URL" / "View experiment at: URL" to stdout itself for every run
    # that ends against an http server (two lines per step); the step's end line names the run instead.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def default_log_file(output: str) -> str:
    """``{output}/logs/run-<UTC time>.log``; a remote ``output`` (s3://) logs to the local temp folder."""
    import tempfile

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = (
        os.path.join(tempfile.gettempdir(), "pyoco-logs") if "://" in output else os.path.join(output, "logs")
    )
    return os.path.join(os.path.abspath(base), f"run-{stamp}-{os.getpid()}.log")


class _ScrubbingFormatter(logging.Formatter):
    """Log lines with secrets masked: the log file is as careful as MLflow (tracking URIs redacted)."""

    def format(self, record: logging.LogRecord) -> str:
        from pipelines.tracking import scrub

        return scrub(super().format(record))


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def route_logs() -> None:
    """Send the noisy loggers to the log file and off the console; idempotent, so it is rerun after imports
    that configure their own handlers (``import ray.data`` installs a console handler on ``ray.data``).

    The file handler sits on the root logger and the noisy loggers lose their console handlers and
    propagate to it: ``ray.init(configure_logging=False)`` clears the ``ray`` logger's handlers, so a
    handler put there would not survive the start of Ray."""
    if _log_handler is None:
        return
    root = logging.getLogger()
    for name in ("", *NOISY_LOGGERS):
        logger = logging.getLogger(name) if name else root
        if name not in _saved_loggers:
            _saved_loggers[name] = (list(logger.handlers), logger.propagate)
        logger.handlers = [h for h in logger.handlers if not _is_console(h) and h is not _log_handler]
        logger.propagate = True
    root.addHandler(_log_handler)


def route_ray_output() -> None:
    """Lines that Ray forwards from its processes (``(pid=...) ...``) go to the log file. Ray has no public
    switch for "forward, but elsewhere" (``log_to_driver=False`` would leave them only in Ray's session
    folder), so this swaps the handler of Ray's stdstream dispatcher; a Ray without it keeps printing."""
    if _log_handler is None:
        return
    route_logs()
    with contextlib.suppress(ImportError, AttributeError):
        import ray.data  # configures the ray.data logger, rerouted just below
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        global _saved_data_bars
        data_ctx = ray.data.DataContext.get_current()
        if _saved_data_bars is None:
            _saved_data_bars = data_ctx.enable_progress_bars
        data_ctx.enable_progress_bars = False  # e.g. read_parquet's "Parquet dataset sampling" bar

        route_logs()
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler(_RAY_HANDLER, _write_ray_lines)
        try:
            from ray._private.worker import _global_node

            where = _global_node.get_session_dir_path() if _global_node is not None else None
        except Exception:  # noqa: BLE001 - only for the note below
            where = None
        if where:
            _log("pyoco", logging.INFO, f"Ray's own log files: {where}/logs")


def _log(name: str, level: int, message: str, exc_info=None) -> None:
    """One record straight to the log file (whatever the loggers' levels)."""
    handler = _log_handler
    if handler is not None:
        record = logging.makeLogRecord(
            {"name": name, "levelno": level, "levelname": logging.getLevelName(level)}
        )
        record.msg, record.exc_info = message, exc_info
        handler.handle(record)


def _write_ray_lines(data: dict) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')})"
    level = logging.WARNING if data.get("is_err") else logging.INFO
    for line in data.get("lines", []):
        _log("ray.worker", level, f"{prefix} {line}")


@contextlib.contextmanager
def _native_stderr_to(log_file: str) -> Iterator[None]:
    """fd 2 -> ``log_file`` (appended) while ``sys.stderr`` keeps writing where fd 2 went before."""
    try:
        sys.stderr.flush()
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured stream (CliRunner): not on fd 2 at all
        python_on_fd2 = False
    saved = os.dup(2)
    target = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(target, 2)
    os.close(target)
    real = sys.stderr
    if python_on_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    try:
        yield
    finally:
        if python_on_fd2:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = real
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """tqdm reads ``TQDM_DISABLE`` and transformers ``HF_HUB_DISABLE_PROGRESS_BARS`` once, at import: a
    library imported before quiet_logs (transformers' "Loading weights" bar) is switched off here."""
    restore = []
    for module, is_on, off, on in (
        (
            "transformers.utils.logging",
            "is_progress_bar_enabled",
            "disable_progress_bar",
            "enable_progress_bar",
        ),
        ("diffusers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
        ("huggingface_hub.utils", None, "disable_progress_bars", "enable_progress_bars"),
    ):
        mod = sys.modules.get(module)
        if mod is None or not hasattr(mod, off):
            continue
        was_on = getattr(mod, is_on)() if is_on else not mod.are_progress_bars_disabled()
        getattr(mod, off)()
        if was_on:
            restore.append(getattr(mod, on))
    try:
        yield
    finally:
        for enable in restore:
            enable()


@contextlib.contextmanager
def quiet_logs(ctx: RunContext) -> Iterator[None]:
    """While active, Ray's, MLflow's and DeepSpeed's own output goes to ``ctx.log_file`` (scrubbed) and the
    console shows pyoco's lines only; does nothing with ``ctx.verbose`` or without a log file. Restores
    the loggers (and Ray's console forwarding) on exit."""
    global _log_handler
    if ctx.verbose or not ctx.log_file or _log_handler is not None:
        yield
        return
    os.makedirs(os.path.dirname(ctx.log_file), exist_ok=True)
    handler = logging.FileHandler(ctx.log_file, encoding="utf-8")
    handler.setFormatter(_ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    _log_handler = handler
    # Libraries' own progress bars (tqdm: transformers' weight loading, MLflow's artifact downloads; Ray
    # Data's bars) would print a line per refresh off a terminal; set before Ray starts, so its processes
    # inherit them too.
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    warnings_were_captured = getattr(logging, "_warnings_showwarning", None) is not None
    logging.captureWarnings(True)  # Python warnings (diffusers, torch) -> the py.warnings logger -> the file
    try:
        with contextlib.suppress(ImportError):
            import mlflow  # noqa: F401 - installs its console handler now, so route_logs removes it

        if "ray" in sys.modules:
            route_ray_output()
        route_logs()
        with _library_bars_off(), _native_stderr_to(ctx.log_file):
            yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if _saved_data_bars is not None:
            with contextlib.suppress(ImportError):
                import ray.data

                ray.data.DataContext.get_current().enable_progress_bars = _saved_data_bars
                globals()["_saved_data_bars"] = None
        logging.captureWarnings(warnings_were_captured)
        for name, (handlers, propagate) in _saved_loggers.items():
            logger = logging.getLogger(name) if name else logging.getLogger()
            logger.handlers, logger.propagate = handlers, propagate
        _saved_loggers.clear()
        _log_handler = None
        if "ray" in sys.modules:
            with contextlib.suppress(ImportError, AttributeError):
                import ray
                from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

                dispatcher.remove_handler(_RAY_HANDLER)
                if ray.is_initialized():  # a Ray that outlives the block prints its processes' lines again
                    import functools

                    from ray._private.worker import print_to_stdstream

                    dispatcher.add_handler(
                        "ray_print_logs", functools.partial(print_to_stdstream, ignore_prefix=False)
                    )
        handler.close()


def log_exception(message: str) -> None:
    """The traceback of a failed step, for the log file (the console shows one line)."""
    _log("pyoco", logging.ERROR, message, exc_info=sys.exc_info())


# ------------------------------------------------------------------------------------ training progress
class TrainProgress:
    """A driver-side progress line fed by ``ray.train.report``: workers report their metrics, a Ray Train
    callback (run in the Train controller) hands rank 0's to a tiny actor, and a thread here polls it.

        progress = TrainProgress("train", total_steps=200)
        RunConfig(..., callbacks=[progress.callback])
        with progress:
            trainer.fit()
    """

    def __init__(self, label: str, total_steps: int, *, start_step: int = 0, poll_s: float = 1.0):
        import ray
        from ray.train import UserCallback

        @ray.remote(num_cpus=0)
        class _Latest:  # the controller's last report, read by the driver
            def __init__(self):
                self.metrics = None

            def put(self, metrics):
                self.metrics = metrics

            def get(self):
                return self.metrics

        class _ToDriver(UserCallback):
            def __init__(self, sink):
                self.sink = sink

            def after_report(self, run_context, metrics, checkpoint):
                if metrics and metrics[0]:
                    self.sink.put.remote(dict(metrics[0]))

        self.sink = _Latest.remote()
        self.callback = _ToDriver(self.sink)
        self.total, self.start, self.poll_s = total_steps, start_step, poll_s
        self.label = label
        self._stop = threading.Event()

    def _poll(self, bar) -> None:
        import ray

        try:
            metrics = ray.get(self.sink.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed refresh, not an error
            return
        if metrics and "step" in metrics:
            bar.update(int(metrics["step"]), loss=metrics.get("loss"))

    def __enter__(self) -> TrainProgress:
        from pipelines.common import ProgressLine

        self._bar = ProgressLine(
            self.label, self.total, unit="step", per_item=True, from_first_update=True
        ).__enter__()
        if self.start:
            self._bar.update(self.start)

        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                self._poll(self._bar)

        self._thread = threading.Thread(target=loop, name="pyoco-train-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=15)
        if exc[0] is None:
            self._poll(self._bar)
        self._bar.__exit__(*exc)
        with contextlib.suppress(Exception):
            ray.kill(self.sink)


class _StdoutToLog:
    """``sys.stdout`` during a quiet step: libraries that print there (DeepSpeed's logger holds a handler
    on the stdout of its import time) write to the log file; pyoco's console is stderr."""

    encoding = "utf-8"

    def __init__(self, real):
        self.real, self.pending = real, ""

    def write(self, text: str) -> int:
        if _log_handler is None:
            return self.real.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            _log("stdout", logging.INFO, line)
        return len(text)

    def flush(self) -> None:
        if _log_handler is None:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()


@contextlib.contextmanager
def stdout_to_log() -> Iterator[None]:
    """Inside :func:`quiet_logs`: what is printed to stdout goes to the log file (no-op otherwise)."""
    if _log_handler is None:
        yield
        return
    with contextlib.redirect_stdout(_StdoutToLog(sys.stdout)):
        yield
