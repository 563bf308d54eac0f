"""A thin MLflow adapter shared by the pipeline steps (train, evaluate, registry, workflow).

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)        # explicit > $MLFLOW_TRACKING_URI > sqlite:///./mlflow.db
    run_id = start_run(uri, cfg.mlflow.experiment, run_name="demo-train", config=cfg, tags=run_tags(cfg))
    log_metrics(uri, run_id, {"loss": 0.1}, step=3)
    with system_metrics(uri, run_id):
        ...
    end_run(uri, run_id)

Everything takes an explicit ``tracking_uri`` and ``run_id`` (no global "active run"), because the same run is
written from the driver and from a Ray worker on another process or node.

Secrets never reach MLflow through here: params are the flattened config with secret-looking keys replaced by
``***`` (:func:`pyoco.config.redact`), the config artifact is the same redacted data, and tag/param values that
contain the value of a secret environment variable (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ...)
are masked as a last line of defence. :func:`redact_uri` masks ``user:password@`` and credential query values in URIs, and :func:`scrub` applies it to
every param, tag and text artifact, so a URI that bypassed config validation (which refuses credentials in
URIs) is still masked.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pyoco.config import URI_USERINFO, flatten, is_secret_key, redact

DEFAULT_DB = "mlflow.db"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value

# Tag names shared by train / evaluate / registry (the registry copies some onto model versions).
TAG_KIND = "pyoco.kind"  # "train", "pretrain-image", "evaluate", ...
TAG_NOISE_KIND = "pyoco.noise_kind"
TAG_NOISE_ALPHA = "pyoco.noise_alpha"
TAG_MANIFEST_HASH = "pyoco.data_manifest_hash"
TAG_GIT_REVISION = "pyoco.git_revision"
TAG_VERSION = "pyoco.version"
TAG_CONFIG_HASH = "pyoco.config_hash"
TAG_MODEL_DIR = "pyoco.model_dir"  # the exported model package
TAG_CHECKPOINT = "pyoco.checkpoint"  # the latest Ray Train checkpoint
TAG_EXPORT_WEIGHTS = "pyoco.export_weights"  # "ema" or "raw"

# Credentials a process reads from its own environment: Ray tasks and jobs get these *names*, never values
# (train's worker plan, submit's ${NAME} references).
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)

# Environment variables whose *values* must never be logged (checked in params/tags as a last defence).
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)


# --------------------------------------------------------------------------------------------- resolution
def resolve_tracking_uri(explicit: str | None = None, *, cwd: str | os.PathLike | None = None) -> str:
    """``explicit`` (config), else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///{cwd}/mlflow.db`` (absolute, so
    Ray workers whose working folder differs write to the same database)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # A relative sqlite path: pin it to the driver's folder.
            rel = uri[len("sqlite:///") :]
            uri = "sqlite:///" + str((Path(cwd or os.getcwd()) / rel).resolve())
        return uri
    return "sqlite:///" + str((Path(cwd or os.getcwd()) / DEFAULT_DB).resolve())


# query parameters that carry credentials (S3 presigned URLs, token-in-URL APIs)
_SECRET_QUERY = re.compile(
    r"([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|"
    r"api_key|apikey|password|secret|key)=)[^&#\s'\"<>]+",
    re.IGNORECASE,
)


def redact_uri(uri: str) -> str:
    """Every URI in ``uri`` (one URI, or any text) with its userinfo and credential query values masked:
    ``https://user:pw@host/x`` -> ``https://***@host/x``, ``s3://key:secret@bucket`` -> ``s3://***@bucket``,
    ``...?X-Amz-Signature=abc`` -> ``...?X-Amz-Signature=***``."""
    return _SECRET_QUERY.sub(r"\1***", URI_USERINFO.sub(r"\1***@", str(uri)))


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _environ_snapshot() -> dict[str, str]:
    """os.environ copied safely: MLflow's telemetry thread sets and deletes variables concurrently."""
    for _ in range(10):
        try:
            keys = list(os.environ)
        except RuntimeError:  # changed size during iteration
            continue
        return {k: v for k in keys if (v := os.environ.get(k)) is not None}
    return {}


def _secret_values() -> list[str]:
    env = _environ_snapshot()
    vals = [env.get(k, "") for k in SECRET_ENV_VARS]
    vals += [v for k, v in env.items() if is_secret_key(k) and k.startswith(("AWS_", "MLFLOW_", "PYOCO_"))]
    return sorted({v for v in vals if v and len(v) >= 6}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` with the value of every secret environment variable replaced by ``***``, and every URI's
    credentials masked (:func:`redact_uri`): the last line of defence for whatever bypassed config
    validation (a tracking URI from the environment, a config built in code, a step's outputs)."""
    for v in _secret_values():
        text = text.replace(v, "***")
    return redact_uri(text)


# ------------------------------------------------------------------------------------------------- facts
@functools.lru_cache(maxsize=1)
def pyoco_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyoco")
    except PackageNotFoundError:
        return "0.0.0+unknown"


@functools.lru_cache(maxsize=4)
def git_revision(path: str | None = None) -> str:
    """``git rev-parse HEAD`` of the pyoco checkout (``+dirty`` when tracked files changed), or ``unknown``."""
    where = path or str(Path(__file__).resolve().parent.parent)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PYOCO_GIT_REVISION", "unknown")
    return rev + ("+dirty" if dirty else "") if rev else "unknown"


def safe_params(config: Any) -> dict[str, str]:
    """The flattened config (``train.lr`` -> ``"0.0001"``) with secrets replaced by ``***``."""
    out = {}
    for k, v in flatten(redact(config)).items():
        s = scrub("" if v is None else str(v))
        out[k] = s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."
    return out


def config_yaml(config: Any) -> str:
    """The redacted config as YAML text (what is logged as the ``config/resolved.yaml`` artifact)."""
    data = redact(config)
    return scrub(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


# ------------------------------------------------------------------------------------------------- runs
def start_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    config: Any = None,
    tags: Mapping[str, Any] | None = None,
    config_artifact: str = "config/resolved.yaml",
) -> str:
    """Create a run (creating the experiment if needed), log params + the config artifact + tags; its id."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
    all_tags = {TAG_GIT_REVISION: git_revision(), TAG_VERSION: pyoco_version(), **(tags or {})}
    all_tags.setdefault("mlflow.source.git.commit", all_tags[TAG_GIT_REVISION].removesuffix("+dirty"))
    run = c.create_run(exp_id, run_name=run_name, tags={k: scrub(str(v)) for k, v in all_tags.items()})
    run_id = run.info.run_id
    if config is not None:
        log_params(tracking_uri, run_id, safe_params(config))
        log_text(tracking_uri, run_id, config_yaml(config), config_artifact)
    return run_id


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, scrub(str(v))[:MAX_PARAM_CHARS]) for k, v in params.items()]
    c = client(tracking_uri)
    for i in range(0, len(items), 100):  # MLflow's per-request limit
        c.log_batch(run_id, params=items[i : i + 100])


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    c = client(tracking_uri)
    c.log_batch(run_id, tags=[RunTag(k, scrub(str(v))) for k, v in tags.items()])


def log_metrics(
    tracking_uri: str,
    run_id: str,
    metrics: Mapping[str, float],
    *,
    step: int,
    synchronous: bool = True,
    mlflow_client=None,
) -> None:
    """One batch of metrics at ``step``. ``synchronous=False`` queues it (MLflow's async logging) so a training
    step never waits on the tracking server."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
    (mlflow_client or client(tracking_uri)).log_batch(run_id, metrics=items, synchronous=synchronous)


class MetricsLogger:
    """Per-step metrics without making the training step wait: ``log`` queues, a background thread sends
    batches every ``flush_s`` seconds, ``close`` sends the rest. A failing server costs a printed warning,
    never the training run."""

    def __init__(self, tracking_uri: str, run_id: str, *, flush_s: float = 1.0):
        import queue
        import threading

        self.tracking_uri, self.run_id, self.flush_s = tracking_uri, run_id, flush_s
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._client = client(tracking_uri)
        self._thread = threading.Thread(target=self._run, name="pyoco-mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is not None:
                self._q.put(Metric(k, float(v), ts, int(step)))

    def _drain(self) -> None:
        import queue

        items = []
        while True:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                break
        for i in range(0, len(items), 1000):  # MLflow's per-request metric limit
            try:
                self._client.log_batch(self.run_id, metrics=items[i : i + 1000])
            except Exception as err:  # noqa: BLE001
                print(f"pyoco: MLflow metrics not logged ({type(err).__name__}: {scrub(str(err))[:200]})")

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self._drain()
        self._drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(tracking_uri).log_text(run_id, scrub(text), artifact_file)


def log_artifact(
    tracking_uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None
) -> None:
    client(tracking_uri).log_artifact(run_id, str(path), artifact_path)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status)


@contextlib.contextmanager
def system_metrics(
    tracking_uri: str,
    run_id: str,
    *,
    interval_s: float = 10.0,
    node_id: str | None = None,
    resume: bool = False,
) -> Iterator[None]:
    """MLflow system metrics (CPU, memory, disk, network, GPU when present) logged to ``run_id`` every
    ``interval_s`` while the block runs. A monitor that cannot start (e.g. psutil missing) is skipped."""
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval_s,
            samples_before_logging=1,
            resume_logging=resume,
            node_id=node_id,
            tracking_uri=tracking_uri,
        )
        monitor.start()
    except Exception as err:  # noqa: BLE001 - metrics are best effort, training is not
        print(f"pyoco: system metrics disabled ({type(err).__name__}: {err})")
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()


def artifact_texts(
    tracking_uri: str, run_id: str, suffixes: tuple[str, ...] = (".yaml", ".json", ".txt")
) -> dict:
    """Download a run's text artifacts into memory (``{path: text}``); used by leak checks."""
    c = client(tracking_uri)
    out: dict[str, str] = {}

    def walk(path: str | None) -> None:
        for f in c.list_artifacts(run_id, path):
            if f.is_dir:
                walk(f.path)
            elif f.path.endswith(suffixes):
                with tempfile.TemporaryDirectory() as tmp:
                    local = c.download_artifacts(run_id, f.path, tmp)
                    out[f.path] = Path(local).read_text(errors="replace")

    walk(None)
    return out
