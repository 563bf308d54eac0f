"""The plan of a training run: the worker environment (settings by value, credentials by name), the
resolved config (derived defaults filled once), the step horizon, and the :class:`WorkerPlan` each rank
gets."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from pipelines.common import PyocoError
from pipelines.tracking import CREDENTIAL_ENV
from pyoco.config import NoiseConfig, PretrainConfig, PyocoConfig, TrainConfig

# Environment variables a worker needs to reach S3 and MLflow, in two kinds. Settings travel by value in the
# (pickled) train-loop config, not Ray's runtime_env, whose contents Ray writes to its own logs.
# Credentials travel by *name* only: task and actor arguments live in Ray's control plane and object store
# (which spills to disk), so a worker reads their values from its own environment (an embedded Ray's
# workers inherit this process's; cluster nodes get them from their setup: infra/local, an instance
# role, a Kubernetes Secret, or the ``${NAME}`` references `pyoco submit` puts in the job's env_vars).
FORWARDED_ENV = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "PYOCO_CACHE",
)


class SecretEnv(dict):
    """Environment values shipped to workers (settings only, see FORWARDED_ENV); repr shows names only."""

    def __repr__(self) -> str:
        return f"SecretEnv({sorted(self)})"

    __str__ = __repr__


def worker_env(environ: dict[str, str] | None = None) -> tuple[SecretEnv, tuple[str, ...]]:
    """(settings to ship by value, names of the credentials set here that the workers must have)."""
    env = os.environ if environ is None else environ
    values = SecretEnv({k: env[k] for k in FORWARDED_ENV if env.get(k)})
    return values, tuple(k for k in CREDENTIAL_ENV if env.get(k))


def apply_worker_env(env: dict[str, str], credential_names: tuple[str, ...]) -> list[str]:
    """On a worker: set the shipped settings (without overriding the node's own), and return the names
    of credentials the driver had but this worker's environment lacks (a warning, not an error: the
    node may serve S3 by an instance role)."""
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return [k for k in credential_names if not os.environ.get(k)]


# =============================================================================================== resolution
def _join(uri: str, *parts: str) -> str:
    from pyoco.storage import join

    return join(uri, *parts)


def _abs(uri: str) -> str:
    from pyoco.storage import is_remote

    return uri if is_remote(uri) or uri.startswith("file://") else str(Path(uri).expanduser().resolve())


def pretrain_config(cfg: PyocoConfig) -> PyocoConfig:
    """The workflow config with its ``pretrain:`` section (defaults when absent) as the training settings."""
    out = cfg.model_copy(deep=True)
    p = cfg.pretrain or PretrainConfig()
    out.train = TrainConfig.model_validate({**p.model_dump(), "image_pretrain": True})
    if out.train.data is None:
        out.train.data = cfg.train.data
    out.train.output = out.train.output or _join(cfg.output, "pretrained-image")
    out.train.storage_path = out.train.storage_path or _join(cfg.output, "ray-pretrain")
    out.model.train_layers = "all"
    out.noise = NoiseConfig(kind="iid", alpha=0.0)  # an image model: frames are independent (T = 1)
    return out


def resolve_config(cfg: PyocoConfig, *, image_pretrain: bool = False) -> PyocoConfig:
    """Fill the defaults that depend on other sections, once: data, output, storage path, run name, and for
    image pretraining the trained layers and the prior."""
    cfg = cfg.model_copy(deep=True)
    t = cfg.train
    image_pretrain = image_pretrain or t.image_pretrain
    t.image_pretrain = image_pretrain
    if t.data is None:
        if cfg.preprocess is None:
            raise PyocoError("train.data is not set and there is no preprocess: section to take it from")
        t.data = _join(cfg.preprocess.output, "clips", "train")
    t.output = t.output or _join(cfg.output, "pretrained-image" if image_pretrain else "model")
    t.storage_path = t.storage_path or _join(cfg.output, "ray-pretrain" if image_pretrain else "ray")
    t.data, t.output, t.storage_path = _abs(t.data), _abs(t.output), _abs(t.storage_path)
    if cfg.model.pretrained:  # a relative folder (the demo's shipped model) must resolve the same on workers
        cfg.model.pretrained = _abs(cfg.model.pretrained)
    # t.run_name stays None unless set: run_train derives it from the settings' key (see the module docstring).
    if image_pretrain:  # an image model: all layers train, frames are independent (T = 1)
        cfg.model.train_layers = "all"
        cfg.noise = NoiseConfig(kind="iid", alpha=0.0)
    return cfg


def total_steps(train: TrainConfig, num_rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps to run, optimizer steps per epoch). Each worker gets ``num_rows // world`` rows
    (Ray's equal split) and drops its last partial batch."""
    batches = (num_rows // world_size) // train.batch_size_per_worker
    per_epoch = batches // train.grad_accum_steps
    if per_epoch < 1:
        raise PyocoError(
            f"train.data has {num_rows} clips: too few for {world_size} worker(s) x batch_size_per_worker "
            f"{train.batch_size_per_worker} x grad_accum_steps {train.grad_accum_steps}"
        )
    steps = [s for s in (train.max_steps, train.epochs * per_epoch if train.epochs else None) if s]
    return min(steps), per_epoch


# ================================================================================================ worker side
@dataclasses.dataclass
class WorkerPlan:
    """Everything a worker needs, resolved once by the driver."""

    config: dict  # PyocoConfig.model_dump(mode="json")
    geometry: dict  # train_data.ClipGeometry
    total_steps: int
    steps_per_epoch: int
    ds_config: dict
    tracking_uri: str
    run_id: str
    null_cond: Any  # np.ndarray (1, L, D)
    null_mask: Any  # np.ndarray (1, L) bool
    sample_cond: Any  # np.ndarray (P, L, D)
    sample_mask: Any  # np.ndarray (P, L) bool
    env: SecretEnv  # settings only (FORWARDED_ENV); never a credential
    compat: dict  # compat_fields(...): checked on restore, stored in every checkpoint
    credential_names: tuple[str, ...] = ()  # CREDENTIAL_ENV set on the driver: names, never values
    vae: str | None = None  # the model's VAE (PretrainedSpec.vae); None: pixel space
    export_uri: str | None = (
        None  # where rank 0 writes the model package (export.staging_uri); None: no export
    )
    text_encoder: dict | None = None  # the text encoder's describe(), recorded in (and packaged with) it
    lineage: dict | None = None  # the package's lineage (run id, data hash, git revision, kind)
    # run_train(callbacks=...): loop callbacks after the defaults (pipelines.train.callbacks), e.g. the tests'
    # fault injection; pickled to the workers, so their classes must be importable there
    callbacks: tuple = ()
