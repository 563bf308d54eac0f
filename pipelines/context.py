"""One run context and one Ray per ``pyoco run``.

    ctx = RunContext.from_config(cfg)            # tracking URI, experiment, storage options, console, log file
    with ray_session(cfg.ray.address):            # Ray is started on first use, shut down at the end
        run_train(cfg, ctx=ctx); run_evaluate(..., ctx=ctx) ...

The tracking URI is resolved once (``mlflow.tracking_uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///`` in the working folder; see :func:`pipelines.tracking.resolve_tracking_uri`) and every step
writes to that server. Without a context a step resolves the same way on its own, so the single-step commands
(``pyoco train``, ``pyoco evaluate``...) behave as before.

Console (quiet_logs, the routing of Ray's output, TrainProgress): :mod:`pipelines.console`.

Ray: a step calls :func:`ensure_ray` instead of ``ray.init``. Outside a session the caller that started Ray
shuts it down (the single-step commands). Inside a :func:`ray_session` the first step that needs Ray starts it
(workflows whose steps are all cached never pay for a Ray start), later steps reuse it, and the session shuts
it down when the workflow ends, only if it was started inside the session; a Ray that was already connected
(a ``pyoco submit`` job, a test fixture) is left alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from pipelines.common import console as default_console
from pipelines.console import default_log_file, route_logs, route_ray_output


@dataclass(frozen=True)
class RunContext:
    """Where a workflow's steps record and read: handed unchanged to every step."""

    tracking_uri: str  # resolved once; may hold credentials in the URI, so never log it unredacted
    experiment: str
    registered_model: str
    storage_options: Any = None  # pyoco.storage.StorageOptions (endpoint, credentials; repr hides secrets)
    console: Console = field(default=default_console, compare=False, repr=False)
    log_file: str | None = None  # where Ray's, MLflow's and DeepSpeed's own output goes (see quiet_logs)
    verbose: bool = False  # True: that output stays on the console (``pyoco run -v``)

    @classmethod
    def from_config(cls, cfg, *, log_file: str | None = None, verbose: bool = False) -> RunContext:
        """Config first (``mlflow.tracking_uri``), then ``$MLFLOW_TRACKING_URI``, then the sqlite default.
        ``log_file`` defaults to :func:`default_log_file` of ``cfg.output``."""
        from pipelines.tracking import resolve_tracking_uri
        from pyoco.storage import StorageOptions

        return cls(
            tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri),
            experiment=cfg.mlflow.experiment,
            registered_model=cfg.mlflow.registered_model,
            storage_options=StorageOptions.from_env(),
            log_file=log_file or default_log_file(cfg.output),
            verbose=verbose,
        )

    def cache_identity(self) -> dict[str, str]:
        """What a step's cache key must cover of this context: which server, experiment and model name
        (credentials stripped, so they never reach the workflow state)."""
        from pipelines.tracking import redact_uri

        return {
            "tracking_uri": redact_uri(self.tracking_uri),
            "experiment": self.experiment,
            "registered_model": self.registered_model,
        }


# --------------------------------------------------------------------------------------------------- Ray
_session_depth = 0
_session_started = False

# Ray kills an idle worker process after 1 s once more workers exist than CPUs, and pyoco's stages have more
# tasks in flight than CPUs (quarter-CPU light tasks, decode tasks waiting on their unit's task), so a run kept
# killing and restarting workers: 40 worker starts (~1.4 s CPU each, a third of the run's CPU) in one 600-video
# preprocess on 2 cores. Idle workers now live for a minute: 14 starts, 43 s -> 31 s (bench/preprocess.py).
# Set on every Ray node pyoco starts (here, infra/local/services.py, ray_cluster.yaml, infra/kuberay);
# a value already in the environment wins.
WORKER_POOL_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def apply_worker_pool_env(env: dict | None = None) -> dict:
    """Put :data:`WORKER_POOL_ENV` into ``env`` (default ``os.environ``, which a local ``ray.init`` passes on
    to the raylet it starts) unless already set there; returns ``env``."""
    env = os.environ if env is None else env
    for key, value in WORKER_POOL_ENV.items():
        env.setdefault(key, value)
    return env


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> bool:
    """Connect to (or start) Ray unless it is already up. True when the caller owns the Ray it got and
    should shut it down; always False inside a :func:`ray_session` (the session shuts it down)."""
    global _session_started
    import ray

    if ray.is_initialized():
        return False
    route_logs()  # `import ray` gave the ray logger a console handler and propagate=False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, configure_logging=False, **init_kwargs)
    else:
        apply_worker_pool_env()
        ray.init(include_dashboard=False, configure_logging=False, **init_kwargs)
    route_ray_output()
    if _session_depth > 0:
        _session_started = True
        return False
    return True


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """One Ray for everything inside the block: started lazily by the first :func:`ensure_ray`, shut down
    at the end if (and only if) it was started inside the block."""
    global _session_depth, _session_started
    import ray

    outer = _session_depth == 0
    if outer:
        _session_started = False
    _session_depth += 1
    try:
        yield
    finally:
        _session_depth -= 1
        if outer:
            if _session_started and ray.is_initialized():
                ray.shutdown()
            _session_started = False
