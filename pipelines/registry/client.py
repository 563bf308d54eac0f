"""The registry's names (aliases; lineage, registered-model, version and lock tags), its conflict error, and
the MLflow client helpers the other registry modules share."""

from __future__ import annotations

import getpass
import os
from datetime import datetime, timezone
from typing import Any

from pipelines.common import PyocoError

CHALLENGER = "challenger"
CHAMPION = "champion"
DEFAULT_NAME = "pyoco-video"
LOCK_SUFFIX = ".pyoco-lock"
PYFUNC_ARTIFACT_PATH = "pyfunc"

# lineage tags, the same names as pipelines.tracking's run tags (copied onto model versions)
TAG_MODEL_DIR = "pyoco.model_dir"
TAG_MANIFEST_HASH = "pyoco.data_manifest_hash"
TAG_NOISE_KIND = "pyoco.noise_kind"
TAG_NOISE_ALPHA = "pyoco.noise_alpha"
TAG_GIT_REVISION = "pyoco.git_revision"
# registered-model tags
T_GENERATION = "pyoco.generation"
T_HISTORY = "pyoco.history."
# model-version tags
V_METRIC = "pyoco.metric."
V_PREVIOUS = "pyoco.previous_champion"
V_STATUS = "pyoco.status"
V_EVAL_HASH = "pyoco.eval_data_hash"
V_EVAL_DATA = "pyoco.eval_data"  # the preprocess output the metrics were computed on (for --reevaluate)
V_EVAL_CONFIG = "pyoco.eval_config"  # the evaluate settings, JSON (for --reevaluate)
V_REEVAL = "pyoco.reeval."  # pyoco.reeval.<eval_data_hash>.<metric>: the version re-evaluated on other data
UNKNOWN = "unknown"
# lock tags
L_OWNER = "pyoco.lock.owner"
L_LEASE_MS = "pyoco.lock.lease_ms"  # the lease, counted from the lock's server-stamped last update


class RegistryConflict(PyocoError):
    """The registry changed under a transaction that held the lock (lock broken, or a foreign client).
    ``event`` is the history event this transaction wrote, when it got that far (with its nonce)."""

    event: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ tracking
def _tracking_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI, else what mlflow resolves (``mlflow.set_tracking_uri``, $MLFLOW_TRACKING_URI, or
    sqlite:///mlflow.db in the working folder), with a relative sqlite path pinned to an absolute one."""
    import mlflow

    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri or mlflow.get_tracking_uri())


def _client(tracking_uri: str | None = None):
    """A client whose registry is the tracking server (or $MLFLOW_REGISTRY_URI when set)."""
    from mlflow import MlflowClient

    uri = _tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _error_code(err: BaseException) -> str | None:
    return getattr(err, "error_code", None)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 (no passwd entry in some containers)
        return "unknown"


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        if _error_code(err) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PyocoError(f"run {run_id!r} not found at {client.tracking_uri}") from None
        raise
