"""``pyoco train`` and ``pyoco pretrain-image``: Ray Train (V2 API) workers finetune the inflated video UNet with
DeepSpeed ZeRO and the PYoCo noise prior; checkpoints, resume, fault tolerance, MLflow tracking and a
consolidated diffusers export.

    run_train(cfg)                        # -> {"model_dir", "checkpoint", "mlflow_run_id", "final_step", ...}
    run_train(pretrain_config(cfg), image_pretrain=True)

Driver (this process): resolve the config once, read the clips' geometry, compute the null/sample caption
embeddings with the text encoder (so workers never load it), open the MLflow run (params, config artifact,
DeepSpeed config, tags), start ``TorchTrainer`` over a streaming Ray Dataset of ``clips/*.parquet``, and at the
end consolidate the final checkpoint into a model package (``pyoco.package``: ``unet/`` safetensors in diffusers
format, ``scheduler/``, ``pyoco_package.json``) at ``train.output``.

Worker (:func:`train_loop_per_worker`, one per rank): typed config on the first line, build/load the UNet
(inflated unless image pretraining), ``deepspeed.initialize`` with the generated config
(:mod:`pipelines.train.deepspeed`), EMA (:mod:`pipelines.train.ema`), restore from ``ray.train.get_checkpoint()``, then
the loop: stream batches (:mod:`pipelines.train.data`), ``DiffusionLoss`` with the prior and a per-rank
generator, backward/step, log, checkpoint every ``checkpoint_every`` steps, sample every ``sample_every`` steps.

Checkpoint layout (one Ray checkpoint = the merged folders of all ranks)::

    checkpoint_00000010/
      ds/...                    DeepSpeed checkpoint (model + optimizer + LR schedule; ZeRO shards per rank)
      latest                    DeepSpeed's tag pointer
      pyoco/train_state.json    step, ZeRO stage, world size, trainable names, geometry, compatibility (rank 0)
      pyoco/unet/config.json    the UNet architecture (rank 0)
      pyoco/ema_rank000.safetensors ...  EMA (rank 0 at ZeRO 0-2; one shard per rank at ZeRO-3), JSON metadata
      pyoco/rng_rank000.safetensors ...  per-rank RNG states (noise generator, torch, numpy as tensors; numpy's
                                         scalars and Python's state as JSON metadata)

No pyoco state is pickled, and DeepSpeed's ``ds/`` files are loaded with ``torch.load(weights_only=True)`` on
resume: whoever can write the checkpoint bucket cannot run code on the workers. (The export's ZeRO
consolidation, DeepSpeed's ``zero_to_fp32``, still unpickles fully; see the issue-12 notes.)

Resume: Ray Train V2 restarts the worker group from the latest checkpoint after a worker failure
(``FailureConfig(max_failures)``), and a new ``pyoco train`` with the same ``storage_path`` and run name picks
up the run's latest checkpoint too. The data stream restarts at a fresh (reshuffled) epoch; model, optimizer,
LR position, EMA, step and RNG states are restored exactly.

A changed config never resumes an old run:

- the default run name carries a key of the settings (``{name}-train-{key}``): the workflow's train step key,
  or, for ``pyoco train``, the compatibility hash below; an explicit ``train.run_name`` is used as given;
- every checkpoint records a compatibility hash and its fields (:func:`compat_fields`: everything that changes
  what is learned: model, noise, data hash, optimiser, batch, seed, prediction type, trained layers, and the
  step horizon when the LR schedule depends on it). Resuming from a checkpoint whose fields differ is refused
  with one line naming them, on the driver before Ray Train starts and again in each worker;
- resuming with a different ``num_workers`` is refused (ZeRO shards and per-rank RNG/EMA state are per rank).

Extending ``max_steps`` under a constant LR schedule keeps the hash (and so resumes and trains on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pipelines.tracking import CREDENTIAL_ENV
from pyoco.config import NoiseConfig, PretrainConfig, PyocoConfig, TrainConfig, load_config

CHECKPOINT_TAG = "ds"
STATE_DIR = "pyoco"
TRAIN_STATE = "train_state.json"
MLFLOW_RUN_FILE = "pyoco_mlflow_run.json"
FAULT_MARKER = "pyoco_fault_injected_at_step_{step}"
WARMUP_STEPS_EXCLUDED = 2  # first steps of an attempt left out of the step-time median
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
    """Fill the defaults that depend on other sections, once: data, output, storage path, run name."""
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
    if image_pretrain:
        cfg.model.train_layers = "all"
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


# ========================================================================================= compatibility
# Settings that do not change what is learned, left out of the compatibility hash: where things go, how often
# to log/checkpoint/sample, fault injection and retries, worker resources, and the stopping point (except as the
# LR schedule's horizon). num_workers is checked on its own (a different world cannot load the per-rank state).
_TRAIN_EXCLUDED = {
    "data",
    "output",
    "storage_path",
    "num_workers",
    "use_gpu",
    "resources_per_worker",
    "max_steps",
    "epochs",
    "checkpoint_every",
    "num_to_keep",
    "max_failures",
    "log_every",
    "sample_every",
    "sample_prompts",
    "sample_seeds",
    "sample_steps",
    "sample_guidance",
    "fail_at_step",
    "run_name",
    "system_metrics_interval_s",
}
_MODEL_EXCLUDED = {"cache_dir", "gradient_checkpointing"}


def compat_fields(cfg: PyocoConfig, geometry, *, total: int, data_hash: str | None) -> dict[str, Any]:
    """The dotted settings a checkpoint may only be resumed with unchanged (JSON-able values)."""
    from pyoco.config import flatten

    t = cfg.train
    fields: dict[str, Any] = {}
    for k, v in flatten(t.model_dump(mode="json", exclude=_TRAIN_EXCLUDED), "train").items():
        fields[k] = v
    for k, v in flatten(cfg.model.model_dump(mode="json", exclude=_MODEL_EXCLUDED), "model").items():
        fields[k] = v
    fields["noise.kind"] = "iid" if t.image_pretrain else cfg.noise.kind
    fields["noise.alpha"] = float(cfg.noise.alpha)
    fields["data.hash"] = data_hash
    for k in ("num_frames", "height", "width", "text_len", "text_dim", "token_level"):
        fields[f"data.{k}"] = getattr(geometry, k)
    if t.lr_schedule != "constant":  # the decay's end point depends on the horizon
        fields["train.total_steps"] = int(total)
    return fields


def compat_hash(fields: dict[str, Any]) -> str:
    from pyoco.config import config_hash

    return config_hash(fields)


def check_resume(state: dict, fields: dict[str, Any], world: int, *, where: str) -> None:
    """Raise a one-line PyocoError unless the checkpoint ``state`` (its train_state.json) was written by a
    run with these ``fields`` and ``world`` workers."""
    hint = "set another train.run_name or delete that run to start over"
    compat = state.get("compat")
    if not isinstance(compat, dict) or "fields" not in compat:
        raise PyocoError(f"{where}: checkpoint has no compatibility record (older pyoco); {hint}")
    saved = compat["fields"]
    if compat.get("hash") != compat_hash(fields) or saved != fields:
        diff = [
            k for k in sorted(set(saved) | set(fields)) if saved.get(k, "<unset>") != fields.get(k, "<unset>")
        ]
        shown = ", ".join(
            f"{k} {saved.get(k, '<unset>')!r} -> {fields.get(k, '<unset>')!r}" for k in diff[:6]
        )
        more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
        raise PyocoError(
            f"{where}: refusing to resume a checkpoint trained with different settings: {shown}{more}; {hint}"
        )
    if int(state.get("world_size", world)) != int(world):
        raise PyocoError(
            f"{where}: checkpoint was written by {state.get('world_size')} workers, this run has "
            f"train.num_workers {world}; resuming needs the same number (set train.num_workers: "
            f"{state.get('world_size')}, or another train.run_name to start over)"
        )


def _check_existing_checkpoints(t: TrainConfig, fields: dict[str, Any]) -> int | None:
    """Driver-side check of the run's checkpoints in storage before Ray Train resumes from one; returns the
    latest step found (None when the run has none)."""
    from pyoco import storage

    run_uri = _join(t.storage_path, t.run_name)
    fs, root = storage.filesystem(run_uri)
    try:
        try:
            listing = fs.ls(root, detail=False, **({"refresh": True} if storage.is_remote(run_uri) else {}))
        except FileNotFoundError:
            return None
        latest = None
        for name in sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing):
            if not name.startswith("checkpoint_"):
                continue
            state_uri = _join(run_uri, name, STATE_DIR, TRAIN_STATE)
            try:
                state = json.loads(storage.read_bytes(state_uri))
            except FileNotFoundError:
                continue  # not one of ours (or not committed): Ray would not resume from it either
            check_resume(state, fields, t.num_workers, where=f"{run_uri}/{name}")
            latest = max(latest or 0, int(state.get("step", 0)))
        return latest
    finally:
        # s3fs caches listings per (shared) filesystem instance; Ray Train and later reads on this driver must
        # not see the run folder as it was before training wrote to it.
        fs.invalidate_cache(root)


# ============================================================================================== the model
def build_denoiser(model_cfg, *, image_pretrain: bool):
    """(VideoDenoiser, pretrained scheduler config or None) for ``model_cfg``.

    ``model.pretrained``: an image UNet folder (diffusers pipeline or bare unet, local or s3://; inflated here
    unless image pretraining) or a video model / pyoco package (trained further as it is). None: the tiny UNet
    from ``model.tiny`` and ``model.seed``."""
    from pyoco.model import (
        TinyUNetConfig,
        VideoDenoiser,
        build_unet2d,
        inflate,
        load_scheduler_config,
        load_unet2d,
        pyoco_model_info,
    )

    def video(unet2d):
        if image_pretrain:
            return VideoDenoiser(unet2d)
        return VideoDenoiser(
            inflate(
                unet2d,
                motion_max_seq_length=model_cfg.motion_max_seq_length,
                motion_num_attention_heads=model_cfg.motion_num_attention_heads,
                seed=model_cfg.seed,
            )
        )

    if model_cfg.pretrained:
        info = pyoco_model_info(model_cfg.pretrained) or {}
        if info.get("is_video"):
            if image_pretrain:
                raise PyocoError(
                    f"model.pretrained {model_cfg.pretrained} is a video model; image pretraining "
                    "needs an image UNet (or none)"
                )
            model = VideoDenoiser.from_pretrained(model_cfg.pretrained, cache_dir=model_cfg.cache_dir)
        else:
            model = video(load_unet2d(model_cfg.pretrained, cache_dir=model_cfg.cache_dir))
        return model, load_scheduler_config(model_cfg.pretrained)
    tiny = TinyUNetConfig(**model_cfg.tiny.model_dump())
    return video(build_unet2d(tiny, seed=model_cfg.seed)), None


# ========================================================================================= RNG state
def save_rng_state(path: str | Path, generator) -> None:
    """This process's RNG streams (the noise ``generator``, torch's CPU RNG, numpy's, Python's) as one
    safetensors file: the states as tensors, numpy's scalars and Python's state as JSON metadata."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    save_file(
        {
            "generator": generator.get_state().cpu(),
            "torch": torch.get_rng_state(),
            "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        },
        str(path),
        metadata={
            "numpy": json.dumps([name, int(pos), int(has_gauss), float(gauss)]),
            "python": json.dumps([version, list(py_state), py_gauss]),
        },
    )


def load_rng_state(path: str | Path, generator) -> None:
    """Restore what :func:`save_rng_state` wrote (nothing is unpickled)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        gen, cpu, key = f.get_tensor("generator"), f.get_tensor("torch"), f.get_tensor("numpy_key")
    if "numpy" not in meta or "python" not in meta:
        raise ValueError(f"{path}: not a pyoco RNG state file (metadata missing)")
    name, pos, has_gauss, gauss = json.loads(meta["numpy"])
    version, py_state, py_gauss = json.loads(meta["python"])
    generator.set_state(gen)
    torch.set_rng_state(cpu)
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((version, tuple(py_state), py_gauss))


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
    fault_marker: str | None
    env: SecretEnv  # settings only (FORWARDED_ENV); never a credential
    compat: dict  # compat_fields(...): checked on restore, stored in every checkpoint
    credential_names: tuple[str, ...] = ()  # CREDENTIAL_ENV set on the driver: names, never values


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: one call per worker (and again after each restart)."""
    plan = WorkerPlan(**config)
    missing = apply_worker_env(plan.env, tuple(plan.credential_names))
    if missing:
        print(
            f"pyoco: {', '.join(missing)} set on the driver but not in this Ray worker's environment; "
            "credentials are never shipped in task arguments, so give them to the nodes (or use a role)",
            flush=True,
        )
    Trainer(plan).fit()


class Trainer:
    """One rank's training loop: ``fit`` -> ``train_step`` -> ``forward_backward``."""

    def __init__(self, plan: WorkerPlan):
        import ray.train
        import torch

        from pipelines.train.data import ClipGeometry
        from pipelines.train.deepspeed import make_lr_scheduler, setup_deepspeed, use_bf16
        from pyoco.diffusion import DiffusionLoss, make_scheduler_config
        from pyoco.noise import make_prior, rank_generator

        t_start = time.perf_counter()
        self.plan = plan
        self.cfg = PyocoConfig.model_validate(plan.config)
        self.t = self.cfg.train
        self.geometry = ClipGeometry.from_dict(plan.geometry)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.image = self.t.image_pretrain

        self.deepspeed = setup_deepspeed(self.t.use_gpu)
        if self.t.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(self.t.resources_per_worker.get("CPU", 1))))
        self.dtype = torch.bfloat16 if use_bf16(self.t) else torch.float32

        model, pretrained_sched = build_denoiser(self.cfg.model, image_pretrain=self.image)
        model.set_trainable("all" if self.image else self.cfg.model.train_layers)
        if self.cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.scheduler_config = make_scheduler_config(pretrained_sched, self.t.num_train_timesteps)
        self.vae = None
        if self.cfg.model.vae:
            from pyoco.model import load_vae

            self.vae = load_vae(self.cfg.model.vae, cache_dir=self.cfg.model.cache_dir).to(
                self.device, self.dtype
            )
            self.vae.requires_grad_(False).eval()

        # Ray Train already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed wraps it.
        self.deepspeed.init_distributed(dist_backend="nccl" if self.t.use_gpu else "gloo")
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, self.lr_scheduler = self.deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=plan.ds_config,
            lr_scheduler=make_lr_scheduler(self.t, plan.total_steps),
        )
        self.module = self.engine.module
        self.trainable_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.ema = None
        if self.t.ema_decay:
            from pipelines.train.ema import ShardedEMA

            named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
            self.ema = ShardedEMA(named, self.t.ema_decay, rank=self.rank)

        self.loss_fn = DiffusionLoss(
            self.scheduler_config,
            prediction_type=self.t.prediction_type,
            min_snr_gamma=self.t.min_snr_gamma,
            caption_dropout=self.t.caption_dropout,
        )
        kind = "iid" if self.image else self.cfg.noise.kind
        self.prior = make_prior(kind, self.cfg.noise.alpha)
        # Per-rank stream for the diffusion noise, timesteps and dropout (pyoco.noise.rank_generator), on the
        # device so the noise is drawn where it is used.
        self.generator = rank_generator(self.t.seed, self.rank, device=self.device)
        self.null_cond = torch.as_tensor(plan.null_cond).to(self.device)
        self.null_mask = torch.as_tensor(plan.null_mask).to(self.device)

        self.step = 0
        self.resumed_from: int | None = None
        self.last_checkpoint_step = 0
        self._restore()
        if self.rank == 0:
            n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
            print(
                f"pyoco: rank 0 ready in {time.perf_counter() - t_start:.1f}s: {type(model.unet).__name__}, "
                f"{n_train / 1e6:.2f}M trainable params, ZeRO-{self.t.zero_stage}, {self.dtype}, "
                f"world {self.world}, step {self.step}/{plan.total_steps}",
                flush=True,
            )
        self.mlflow = self.metrics_logger = None
        if self.rank == 0:
            from pipelines import tracking

            self.mlflow = tracking.client(plan.tracking_uri)
            self.metrics_logger = tracking.MetricsLogger(plan.tracking_uri, plan.run_id)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _state_files(self, root: Path) -> Path:
        d = root / STATE_DIR
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _restore(self) -> None:
        """Resume from Ray's checkpoint, after checking it was written by this config and world size.

        Nothing here runs code from the checkpoint: our own state (RNG, EMA, train_state.json) holds no
        pickles, and DeepSpeed's ``ds/`` files are read with ``weights_only=True``
        (:func:`pipelines.train.deepspeed.use_weights_only_loading`; DeepSpeed 0.19's ``load_checkpoint`` has no
        such argument)."""
        import ray.train

        from pipelines.train.deepspeed import use_weights_only_loading
        from pipelines.train.ema import ema_file, load_ema_state

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            root = Path(d)
            state_dir = root / STATE_DIR
            state_file = state_dir / TRAIN_STATE
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            check_resume(state, self.plan.compat, self.world, where=str(ckpt.path))
            use_weights_only_loading(self.engine)
            path, client_state = self.engine.load_checkpoint(
                str(root), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise RuntimeError(f"{ckpt.path}: no DeepSpeed checkpoint under tag {CHECKPOINT_TAG!r}")
            self.step = int(client_state["step"])
            if self.ema is not None:
                self.ema.load_state_dict(
                    load_ema_state(ema_file(state_dir, self.rank if self.ema.zero3 else 0))
                )
            rng_file = state_dir / f"rng_rank{self.rank:03d}.safetensors"
            if rng_file.exists():
                load_rng_state(rng_file, self.generator)
        self.resumed_from = self.step
        self.last_checkpoint_step = self.step
        if self.rank == 0:
            print(f"pyoco: resumed from step {self.step} ({ckpt.path})", flush=True)

    def save_checkpoint(self, metrics: dict) -> None:
        """Every rank writes its part; Ray merges the folders into one checkpoint in storage."""
        import ray.train

        from pipelines.train.ema import ema_file, save_ema_state

        with tempfile.TemporaryDirectory(prefix="pyoco-ckpt-") as tmp:
            root = Path(tmp)
            self.engine.save_checkpoint(str(root), tag=CHECKPOINT_TAG, client_state={"step": self.step})
            state_dir = self._state_files(root)
            save_rng_state(state_dir / f"rng_rank{self.rank:03d}.safetensors", self.generator)
            if self.ema is not None and (self.ema.zero3 or self.rank == 0):
                save_ema_state(self.ema.state_dict(), ema_file(state_dir, self.rank))
            if self.rank == 0:
                self.module.unet.save_config(str(state_dir / "unet"))
                state = {
                    "step": self.step,
                    "zero_stage": self.t.zero_stage,
                    "world_size": self.world,
                    "image_pretrain": self.image,
                    "unet_class": type(self.module.unet).__name__,
                    "ema": self.ema is not None,
                    "ema_decay": self.t.ema_decay,
                    "trainable": self.trainable_names,
                    "geometry": self.plan.geometry,
                    "scheduler_config": self.scheduler_config,
                    "noise": {"kind": self.prior.kind, "alpha": self.prior.alpha},
                    "mlflow_run_id": self.plan.run_id,
                    "compat": {"hash": compat_hash(self.plan.compat), "fields": self.plan.compat},
                }
                (state_dir / TRAIN_STATE).write_text(json.dumps(state, indent=2, default=str))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{self.step:08d}",
            )
        self.last_checkpoint_step = self.step

    # ---------------------------------------------------------------------------------------------- steps
    def prepare(self, batch: dict):
        """Collated CPU batch -> (x0, cond, cond_mask) on the device; x0 in the compute dtype (latents with a
        VAE; one random frame per clip, T = 1, for image pretraining)."""
        import torch

        x0 = batch["x0"]
        if self.image and x0.shape[2] > 1:
            g = self.generator
            idx = torch.randint(0, x0.shape[2], (x0.shape[0],), generator=g, device=g.device).cpu()
            x0 = x0[torch.arange(x0.shape[0]), :, idx].unsqueeze(2)
        x0 = x0.to(self.device, self.dtype, non_blocking=True)
        if self.vae is not None:
            from pyoco.model import encode_video

            with torch.no_grad():
                x0 = encode_video(self.vae, x0)
        cond = batch["cond"].to(self.device, non_blocking=True)
        mask = batch["cond_mask"].to(self.device, non_blocking=True)
        return x0, cond, mask

    def forward_backward(self, batch: dict) -> float:
        x0, cond, mask = self.prepare(batch)
        out = self.loss_fn(
            self.engine,
            x0,
            cond,
            mask,
            self.prior,
            generator=self.generator,
            null_cond=self.null_cond,
            null_mask=self.null_mask,
        )
        self.engine.backward(out.loss)
        return float(out.loss.detach())

    def maybe_inject_fault(self) -> None:
        """Test hook: rank 1 (rank 0 when alone) dies at ``fail_at_step``, once per run (marker in storage)."""
        if self.t.fail_at_step is None or self.step + 1 != self.t.fail_at_step:
            return
        if self.rank != (1 if self.world > 1 else 0) or not self.plan.fault_marker:
            return
        from pyoco import storage

        if storage.exists(self.plan.fault_marker):
            return
        # Die only once Ray has committed the checkpoints reported so far, so the test knows which one the
        # restart must use. (A real crash can outrun the controller; Ray then resumes from the previous one.)
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
        )
        storage.write_bytes(
            self.plan.fault_marker, f"rank {self.rank} exited at step {self.step + 1}\n".encode()
        )
        print(f"pyoco: fault injection: rank {self.rank} exits before step {self.step + 1}", flush=True)
        os._exit(1)

    # ------------------------------------------------------------------------------------------ the loop
    def batches(self):
        """Endless stream of collated batches from this worker's shard; each pass is one (reshuffled) epoch."""
        import ray.train

        from pipelines.train.data import make_collate

        shard = ray.train.get_dataset_shard("train")
        collate = make_collate(self.geometry)
        epoch = 0
        while True:
            n = 0
            for batch in shard.iter_torch_batches(
                batch_size=self.t.batch_size_per_worker,
                drop_last=True,
                local_shuffle_buffer_size=self.t.shuffle_buffer or None,
                local_shuffle_seed=(self.t.seed * 1_000_003 + self.rank * 7919 + epoch * 31 + self.step)
                if self.t.shuffle_buffer
                else None,
                collate_fn=collate,
                prefetch_batches=2,
            ):
                n += 1
                yield batch
            if n == 0:
                raise RuntimeError(f"rank {self.rank}: its data shard has no full batch")
            epoch += 1

    def fit(self) -> None:
        t = self.t
        total = self.plan.total_steps
        attempt_start = self.step
        metrics: dict[str, float] = {}
        step_times: list[float] = []
        loss_window: list[float] = []
        stream = self.batches()
        steady_t0, steady_n = None, 0
        with self._system_metrics():
            tick = time.perf_counter()
            while self.step < total:
                self.maybe_inject_fault()
                lr = float(self.engine.get_lr()[0])
                losses = []
                for _ in range(t.grad_accum_steps):
                    losses.append(self.forward_backward(next(stream)))
                    self.engine.step()  # DeepSpeed steps the optimizer + LR schedule on the last micro-batch
                self.step += 1
                if self.ema is not None:
                    self.ema.update()
                now = time.perf_counter()
                step_time = now - tick
                step_times.append(step_time)
                loss_window.append(sum(losses) / len(losses))
                if self.step - attempt_start == WARMUP_STEPS_EXCLUDED:
                    steady_t0, steady_n = now, 0
                elif steady_t0 is not None:
                    steady_n += 1
                if self.step % t.log_every == 0 or self.step == total:
                    metrics = self.log_step(loss_window, lr, step_time)
                    loss_window = []
                if t.sample_every and self.step % t.sample_every == 0:
                    self.log_samples()
                if self.step % t.checkpoint_every == 0 or self.step == total:
                    summary = self.summary(metrics, step_times, attempt_start, steady_t0, steady_n)
                    self.save_checkpoint(summary)
                tick = time.perf_counter()
        if self.last_checkpoint_step != self.step:  # already at the target when (re)started
            self.save_checkpoint(self.summary(metrics, step_times, attempt_start, steady_t0, steady_n))
        if self.metrics_logger is not None:
            self.metrics_logger.close()

    def summary(self, metrics, step_times, attempt_start, steady_t0, steady_n) -> dict:
        steady = step_times[WARMUP_STEPS_EXCLUDED:] or step_times
        out = {
            "step": self.step,
            "attempt_start_step": attempt_start,
            "loss": metrics.get("loss", float("nan")),
            "step_time_median_s": statistics.median(steady) if steady else float("nan"),
            "steady_steps": len(steady),
        }
        if steady_t0 is not None and steady_n > 0:
            out["loop_time_per_step_s"] = (time.perf_counter() - steady_t0) / steady_n
        return out

    def log_step(self, loss_window: list[float], lr: float, step_time: float) -> dict:
        """Mean loss over the window and all ranks (a collective: every rank calls this), logged by rank 0."""
        import torch
        import torch.distributed as dist

        loss = torch.tensor([sum(loss_window) / max(1, len(loss_window))], dtype=torch.float64)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        grad_norm = self.engine.get_global_grad_norm()
        global_batch = self.t.batch_size_per_worker * self.t.grad_accum_steps * self.world
        metrics = {
            "loss": float(loss.item()),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": step_time,
            "samples_per_s": global_batch / step_time if step_time > 0 else float("nan"),
            "epoch": self.step / max(1, self.plan.steps_per_epoch),
        }
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = float(self.resumed_from)
        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if self.metrics_logger is not None:
            self.metrics_logger.log(metrics, step=self.step)
        return metrics

    @contextlib.contextmanager
    def _system_metrics(self):
        if self.rank != 0 or not self.cfg.mlflow.system_metrics:
            yield
            return
        from pipelines import tracking

        with tracking.system_metrics(
            self.plan.tracking_uri,
            self.plan.run_id,
            interval_s=self.t.system_metrics_interval_s,
            resume=self.resumed_from is not None,
        ):
            yield

    def log_samples(self) -> None:
        """Sample the fixed prompts x seeds (EMA weights when EMA is on). Under ZeRO-3 every rank takes part
        (the forward gathers parameters); otherwise rank 0 alone. Rank 0 logs mp4 + GIF artifacts."""
        import torch

        from pyoco.noise import clip_generators
        from pyoco.sampling import sample_video

        if self.t.zero_stage < 3 and self.rank != 0:
            return
        g = self.geometry
        cond = torch.as_tensor(self.plan.sample_cond).to(self.device)
        mask = torch.as_tensor(self.plan.sample_mask).to(self.device)
        videos = []
        swap = self.ema.swap() if self.ema is not None else contextlib.nullcontext()
        self.module.eval()
        try:
            with swap, torch.no_grad():
                for seed in self.t.sample_seeds:
                    videos.append(
                        sample_video(
                            self.module,
                            cond,
                            mask,
                            prior=self.prior,
                            null_cond=self.null_cond,
                            null_mask=self.null_mask,
                            num_frames=1 if self.image else g.num_frames,
                            height=g.height,
                            width=g.width,
                            steps=self.t.sample_steps,
                            guidance=self.t.sample_guidance,
                            generator=clip_generators(seed, range(cond.shape[0])),
                            scheduler_config=self.scheduler_config,
                            vae=self.vae,
                        )
                    )
        finally:
            self.module.train()
        if self.rank != 0:
            return
        from pyoco.video import write_gif, write_mp4

        with tempfile.TemporaryDirectory(prefix="pyoco-samples-") as tmp:
            for seed, batch in zip(self.t.sample_seeds, videos, strict=True):
                for i, video in enumerate(batch):
                    stem = Path(tmp) / f"prompt{i:02d}_seed{seed}"
                    frames = video.cpu().numpy()
                    write_mp4(frames, f"{stem}.mp4", fps=g.fps)
                    write_gif(frames, f"{stem}.gif", fps=g.fps)
            (Path(tmp) / "prompts.json").write_text(
                json.dumps(
                    {"prompts": self.t.sample_prompts, "seeds": self.t.sample_seeds, "step": self.step}
                )
            )
            self.mlflow.log_artifacts(self.plan.run_id, tmp, f"samples/step_{self.step:06d}")


# ================================================================================================ export
def consolidated_state_dict(ckpt_dir: Path, zero_stage: int) -> dict:
    """fp32 weights of the whole model from a (merged) DeepSpeed checkpoint: ``zero_to_fp32`` for ZeRO 1-3
    (the fp32 master partitions, frozen parameters included), the module states for stage 0."""
    import torch

    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - it prints per shard
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=CHECKPOINT_TAG)
        return {k: v.float() for k, v in sd.items()}
    from pipelines.train.deepspeed import _safe_ds_globals

    with torch.serialization.safe_globals(_safe_ds_globals()):
        states = torch.load(
            ckpt_dir / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
        )
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(
    ckpt_dir: str | Path,
    out_uri: str,
    *,
    cfg: PyocoConfig,
    text_encoder: dict,
    lineage: dict,
) -> dict:
    """Consolidate the checkpoint at ``ckpt_dir`` into a model package at ``out_uri``; returns its facts.

    ``out_uri`` must be absent, empty or an earlier package (see :func:`publish_package`)."""
    from pipelines.train.ema import consolidate, load_ema_shards
    from pyoco.model import VideoDenoiser
    from pyoco.package import PackageInfo, save_package

    root = Path(ckpt_dir)
    state_dir = root / STATE_DIR
    state = json.loads((state_dir / TRAIN_STATE).read_text())
    weights = consolidated_state_dict(root, int(state["zero_stage"]))
    which = "raw"
    if state["ema"]:
        ema = consolidate(load_ema_shards(state_dir))
        unknown = sorted(set(ema) - set(weights))
        if unknown:
            raise RuntimeError(f"EMA holds parameters the model does not have: {unknown[:3]}")
        weights.update(ema)
        which = "ema"
    from diffusers import UNet2DConditionModel, UNetMotionModel

    cls = {"UNetMotionModel": UNetMotionModel, "UNet2DConditionModel": UNet2DConditionModel}[
        state["unet_class"]
    ]
    unet = cls.from_config(cls.load_config(str(state_dir / "unet")))
    model = VideoDenoiser(unet)
    model.load_state_dict(weights, strict=True)
    geo = state["geometry"]
    info = PackageInfo(
        text_encoder=text_encoder,
        noise=dict(state["noise"]),
        height=int(geo["height"]),
        width=int(geo["width"]),
        num_frames=1 if state["image_pretrain"] else int(geo["num_frames"]),
        fps=int(round(geo["fps"])),
        weights=which,
        lineage={
            **lineage,
            "step": state["step"],
            "zero_stage": state["zero_stage"],
            "ema_decay": state["ema_decay"],
        },
    )
    vae = None
    if cfg.model.vae:
        from pyoco.model import load_vae

        vae = load_vae(cfg.model.vae, cache_dir=cfg.model.cache_dir)
    _check_export_target(out_uri)  # before the work, so a wrong train.output costs nothing
    with tempfile.TemporaryDirectory(prefix="pyoco-export-") as tmp:
        local = Path(tmp) / "model"
        save_package(local, model, scheduler_config=state["scheduler_config"], info=info, vae=vae)
        publish_package(local, out_uri)
    return {"weights": which, "step": int(state["step"])}


def _check_export_target(out_uri: str) -> None:
    """Refuse a ``train.output`` that holds anything but an earlier model package (a pyoco package is a
    folder with ``pyoco_package.json`` at its top): export replaces what is there."""
    from pyoco import storage
    from pyoco.package import PACKAGE_FILE

    fs, path = storage.filesystem(out_uri)
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise PyocoError(
            f"train.output {out_uri}: is a file, not a model folder; choose another train.output"
        )
    if fs.ls(path, detail=False) and not fs.isfile(f"{path.rstrip('/')}/{PACKAGE_FILE}"):
        raise PyocoError(
            f"train.output {out_uri}: a non-empty folder that is not a pyoco model package (no {PACKAGE_FILE}); "
            "refusing to replace it: choose another train.output or empty it"
        )


def publish_package(local: Path, out_uri: str) -> None:
    """Put the package folder ``local`` at ``out_uri``, replacing an earlier package there.

    Local: copied to a temporary sibling, then swapped in by two renames (the old package is deleted only
    after the new one is in place). S3 has no rename: the files are uploaded to a sibling staging prefix
    first (a failed upload leaves the old package untouched), copied over server-side with
    ``pyoco_package.json`` last, then keys of the old package that the new one lacks are deleted.
    """
    import shutil
    import uuid

    from pyoco import storage
    from pyoco.package import PACKAGE_FILE

    _check_export_target(out_uri)
    fs, path = storage.filesystem(out_uri)
    path = path.rstrip("/")
    token = uuid.uuid4().hex[:12]
    if not storage.is_remote(out_uri):
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.export-{token}"
        old = dest.parent / f".{dest.name}.replaced-{token}"
        try:
            shutil.copytree(local, tmp)
            if dest.exists():
                os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except OSError:
                if old.exists() and not dest.exists():
                    os.replace(old, dest)  # put the previous package back
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return
    staging = f"{path}.export-{token}"
    fs.put(str(local).rstrip("/") + "/", staging + "/", recursive=True)
    try:
        new = sorted(f[len(staging) :].lstrip("/") for f in fs.find(staging))
        old_keys = {f[len(path) :].lstrip("/") for f in fs.find(path)} if fs.exists(path) else set()
        for rel in sorted(new, key=lambda r: r == PACKAGE_FILE):  # the marker last
            storage.retry_transient(
                lambda rel=rel: fs.copy(f"{staging}/{rel}", f"{path}/{rel}"), what=f"copy {rel}"
            )
        stale = sorted(old_keys - set(new))
        if stale:
            fs.rm([f"{path}/{rel}" for rel in stale])
    finally:
        fs.rm(staging, recursive=True)


# ================================================================================================ driver side
def _ensure_ray(address: str | None) -> bool:
    """Ray for this step: the workflow's session Ray when inside one (see pipelines.context)."""
    from pipelines.context import ensure_ray

    return ensure_ray(address, log_to_driver=True)


def _check_cpus(t: TrainConfig, embedded: bool) -> None:
    """Ray Data needs a CPU to read shards while the workers hold theirs; on a too-small cluster it would
    wait forever, so say so instead."""
    import ray

    if t.use_gpu:
        return
    have = float(ray.cluster_resources().get("CPU", 0))
    need = t.num_workers * float(t.resources_per_worker.get("CPU", 1))
    if have - need < 0.5:
        msg = (
            f"train.num_workers ({t.num_workers}) x resources_per_worker.CPU "
            f"({t.resources_per_worker.get('CPU', 1)}) = {need:g} leaves {have - need:g} of this Ray cluster's "
            f"{have:g} CPUs for reading the data; lower resources_per_worker.CPU (e.g. 0.5) or num_workers"
        )
        if embedded:  # our own single-node Ray: it cannot grow, so this would hang
            raise PyocoError(msg)
        console.print(f"warning: {msg} (unless the cluster autoscales)")


def _arrow_fs(uri: str):
    """(pyarrow filesystem, path) for Ray Data / Ray Train storage; s3 goes through pyoco.storage's s3fs
    (endpoint and region from the AWS environment). The filesystem is pickled into Ray's read tasks and
    the trainer's run config, so it carries no credentials: each process's boto chain finds its own."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pyoco.storage import StorageOptions, filesystem, is_remote

    if not is_remote(uri):
        return None, _abs(uri.removeprefix("file://"))
    opts = dataclasses.replace(StorageOptions.from_env(), key=None, secret=None, token=None)
    fs, path = filesystem(uri, options=opts)
    return PyFileSystem(FSSpecHandler(fs)), path


def _clips_dataset(t: TrainConfig, geometry):
    """A lazy Ray Dataset over the clip shards (only the columns training reads), block order shuffled.

    Read through Ray Data's V1 parquet datasource: the V2 one (default in Ray 2.60) starts a pool of 32
    footer-reader actors on every execution, i.e. every epoch, which costs 15-40 s per epoch on a small node;
    V1 re-reads an epoch of the test shards in well under a second."""
    import ray.data

    data_fs, _ = _arrow_fs(t.data)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        dataset = ray.data.read_parquet(list(geometry.files), filesystem=data_fs, columns=geometry.columns)
    finally:
        ctx.use_datasource_v2 = previous
    if t.shuffle_buffer:
        dataset = dataset.randomize_block_order(seed=t.seed)
    return dataset


def _text_embeddings(cfg: PyocoConfig, geometry) -> tuple[dict, Any, Any, Any, Any]:
    """(encoder description, null cond, null mask, sample cond, sample mask) in the data's layout."""
    import numpy as np

    from pyoco.text import load_text_encoder

    enc = load_text_encoder(
        cfg.model.text_encoder, max_length=geometry.text_len if geometry.token_level else 32
    )
    if enc.dim != geometry.text_dim:
        raise PyocoError(
            f"model.text_encoder {cfg.model.text_encoder!r} gives {enc.dim}-d states but the clips' "
            f"caption_embedding is {geometry.text_dim}-d"
        )
    prompts = list(cfg.train.sample_prompts)
    if geometry.token_level:
        null, null_mask = enc.null_embedding(1)
        cond, mask = enc.encode(prompts) if prompts else (null[:0], null_mask[:0])
    else:  # pooled clips: pooled prompts, one token each
        from pyoco.text import PooledTextEncoder

        enc = PooledTextEncoder(enc)
        null, null_mask = enc.null_embedding(1)
        cond, mask = enc.encode(prompts) if prompts else (null[:0], null_mask[:0])
    as_np = lambda x: x.numpy() if hasattr(x, "numpy") else np.asarray(x)  # noqa: E731
    # The description goes into the package: sampling and evaluation rebuild this encoder from it (pooled
    # and one token for pooled data, the data's token length otherwise).
    return enc.describe(), as_np(null), as_np(null_mask), as_np(cond), as_np(mask)


def _mlflow_run(
    cfg: PyocoConfig, tracking_uri: str, experiment: str, *, kind: str, tags: dict, ds_config: dict
) -> str:
    """The run of this training job: the one recorded next to the Ray run (a resumed job continues it), or a
    new one with params, the resolved config and the DeepSpeed config."""
    from pipelines import tracking
    from pyoco import storage

    t = cfg.train
    record = storage.join(t.storage_path, t.run_name, MLFLOW_RUN_FILE)
    if storage.exists(record):
        try:
            prev = json.loads(storage.read_bytes(record))
            if prev.get("tracking_uri") == tracking.redact_uri(tracking_uri):
                c = tracking.client(tracking_uri)
                run = c.get_run(prev["run_id"])
                c.update_run(run.info.run_id, status="RUNNING")
                tracking.set_tags(tracking_uri, run.info.run_id, tags)
                return run.info.run_id
        except Exception as err:  # noqa: BLE001 - an unreadable record just means a new run
            console.print(f"note: not continuing the previous MLflow run ({type(err).__name__})")
    run_id = tracking.start_run(
        tracking_uri,
        experiment,
        run_name=t.run_name,
        config=cfg,
        tags={**tags, tracking.TAG_KIND: kind},
    )
    tracking.log_text(tracking_uri, run_id, json.dumps(ds_config, indent=2), "deepspeed/ds_config.json")
    storage.write_bytes(
        record, json.dumps({"run_id": run_id, "tracking_uri": tracking.redact_uri(tracking_uri)}).encode()
    )
    return run_id


def run_train(
    cfg: PyocoConfig,
    *,
    image_pretrain: bool = False,
    ctx=None,
    run_key: str | None = None,
) -> dict:
    """Train (or image-pretrain) as ``cfg`` says; returns ``{"model_dir", "checkpoint", "mlflow_run_id",
    "final_step", "weights", "metrics", ...}``. ``model_dir`` is the exported model package.

    ``ctx`` (a :class:`pipelines.context.RunContext`) gives the MLflow server and experiment (default: from
    ``cfg.mlflow`` and the environment). ``run_key`` (the workflow step's cache key) names the Ray Train run
    when ``train.run_name`` is unset; without it the compatibility hash does."""
    from pipelines import tracking
    from pipelines.train.data import DataError, inspect_clips, manifest_hash
    from pipelines.train.deepspeed import deepspeed_config

    if image_pretrain:
        cfg = cfg.model_copy(update={"noise": NoiseConfig(kind="iid", alpha=0.0)})
    elif cfg.noise.is_auto:
        raise PyocoError(
            "noise.kind/noise.alpha 'auto' is fitted by `pyoco run` (its noise_fit step); for `pyoco train`, "
            "run `pyoco noise fit` and set the values it prints"
        )
    cfg = resolve_config(cfg, image_pretrain=image_pretrain)
    t = cfg.train
    image = t.image_pretrain
    kind = "pretrain-image" if image else "train"
    try:
        geometry = inspect_clips(t.data)
    except DataError as err:
        raise PyocoError(str(err)) from None
    if not image and geometry.num_frames > cfg.model.motion_max_seq_length:
        raise PyocoError(
            f"clips have {geometry.num_frames} frames but model.motion_max_seq_length is "
            f"{cfg.model.motion_max_seq_length}"
        )
    if cfg.model.pretrained is None:
        factor = 2 ** (len(cfg.model.tiny.block_out_channels) - 1) * (8 if cfg.model.vae else 1)
        if geometry.height % factor or geometry.width % factor:
            raise PyocoError(
                f"clips are {geometry.height}x{geometry.width}; the model needs multiples of {factor}"
            )
        if cfg.model.tiny.cross_attention_dim != geometry.text_dim:
            raise PyocoError(
                f"model.tiny.cross_attention_dim {cfg.model.tiny.cross_attention_dim} != caption_embedding dim "
                f"{geometry.text_dim}"
            )
    steps, per_epoch = total_steps(t, geometry.num_rows, t.num_workers)
    mhash = manifest_hash(t.data)
    compat = compat_fields(cfg, geometry, total=steps, data_hash=mhash)
    t.run_name = t.run_name or f"{cfg.name}-{kind}-{(run_key or compat_hash(compat))[:12]}"
    resume_step = _check_existing_checkpoints(t, compat)
    ds_config = deepspeed_config(t, world_size=t.num_workers)
    text_desc, null, null_mask, sample_cond, sample_mask = _text_embeddings(cfg, geometry)

    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    started = _ensure_ray(cfg.ray.address)
    try:
        _check_cpus(t, embedded=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))
        tracking_uri = (
            ctx.tracking_uri if ctx is not None else tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        )
        experiment = ctx.experiment if ctx is not None else cfg.mlflow.experiment
        tags = {
            tracking.TAG_NOISE_KIND: "iid" if image else cfg.noise.kind,
            tracking.TAG_NOISE_ALPHA: cfg.noise.alpha,
            tracking.TAG_MANIFEST_HASH: mhash or "none",
            tracking.TAG_CONFIG_HASH: cfg.hash(),
        }
        run_id = _mlflow_run(cfg, tracking_uri, experiment, kind=kind, tags=tags, ds_config=ds_config)

        dataset = _clips_dataset(t, geometry)
        store_fs, store_path = _arrow_fs(t.storage_path)
        forwarded, credential_names = worker_env()
        plan = WorkerPlan(
            config=cfg.model_dump(mode="json"),
            geometry=geometry.to_dict(),
            total_steps=steps,
            steps_per_epoch=per_epoch,
            ds_config=ds_config,
            tracking_uri=tracking_uri,
            run_id=run_id,
            null_cond=null,
            null_mask=null_mask,
            sample_cond=sample_cond,
            sample_mask=sample_mask,
            fault_marker=_join(t.storage_path, t.run_name, FAULT_MARKER.format(step=t.fail_at_step))
            if t.fail_at_step
            else None,
            env=forwarded,
            compat=compat,
            credential_names=credential_names,
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=dataclasses.asdict(plan) | {"env": plan.env},
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers,
                use_gpu=t.use_gpu,
                resources_per_worker=dict(t.resources_per_worker),
            ),
            run_config=ray.train.RunConfig(
                name=t.run_name,
                storage_path=store_path,
                storage_filesystem=store_fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            ),
            datasets={"train": dataset},
        )
        console.print(
            f"{kind}: {t.num_workers} worker(s), ZeRO-{t.zero_stage}, {steps} steps, "
            f"clips {geometry.num_frames}x{geometry.height}x{geometry.width} from {t.data}; run {t.run_name}"
            + (f" (resuming from step {resume_step})" if resume_step is not None else "")
        )
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as err:
            tracking.end_run(tracking_uri, run_id, "FAILED")
            raise PyocoError(f"training failed: {tracking.scrub(str(err)).splitlines()[0][:500]}") from err
        try:
            if result.checkpoint is None:
                raise PyocoError("training finished without a checkpoint")
            ckpt_uri = (
                f"s3://{result.checkpoint.path}" if store_fs is not None else str(result.checkpoint.path)
            )
            lineage = {
                "mlflow_run_id": run_id,
                "data_manifest_hash": mhash,
                "git_revision": tracking.git_revision(),
                "checkpoint": ckpt_uri,
                "kind": kind,
            }
            with result.checkpoint.as_directory() as d:
                exported = export_checkpoint(d, t.output, cfg=cfg, text_encoder=text_desc, lineage=lineage)
            tracking.set_tags(
                tracking_uri,
                run_id,
                {
                    tracking.TAG_MODEL_DIR: t.output,
                    tracking.TAG_CHECKPOINT: ckpt_uri,
                    tracking.TAG_EXPORT_WEIGHTS: exported["weights"],
                },
            )
            tracking.end_run(tracking_uri, run_id, "FINISHED")
        except BaseException as err:  # export or tagging failed: the run must not stay RUNNING
            with contextlib.suppress(Exception):
                tracking.end_run(tracking_uri, run_id, "FAILED")
            if isinstance(err, PyocoError) or not isinstance(err, Exception):
                raise
            first = tracking.scrub(str(err)).strip().splitlines()[0][:500] if str(err).strip() else ""
            raise PyocoError(
                f"export after training failed: {type(err).__name__}: {first}", exit_code=1
            ) from err
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        return {
            "model_dir": t.output,
            "checkpoint": ckpt_uri,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking.redact_uri(tracking_uri),
            "final_step": exported["step"],
            "weights": exported["weights"],
            "run_name": t.run_name,
            "storage_path": t.storage_path,
            "metrics": metrics,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        if started:
            ray.shutdown()


# ==================================================================================================== CLI
def _overrides(prefix: str, **values) -> dict:
    return {f"{prefix}.{k}": v for k, v in values.items() if v is not None}


def register(app: typer.Typer) -> None:
    @app.command("train")
    @cli_errors
    def train_cmd(
        config: Path = typer.Option(
            ..., "--config", help="Workflow YAML (train:, model:, noise:, mlflow: sections)."
        ),
        data: str | None = typer.Option(
            None, "--data", help="Clips folder (default: {preprocess.output}/clips/train)."
        ),
        output: str | None = typer.Option(None, "--output", help="Where the exported model package goes."),
        storage_path: str | None = typer.Option(
            None, "--storage-path", help="Ray Train storage (local or s3://)."
        ),
        max_steps: int | None = typer.Option(
            None, "--max-steps", min=1, help="Optimizer steps to train for."
        ),
        num_workers: int | None = typer.Option(None, "--num-workers", help="Ray Train workers."),
        zero_stage: int | None = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
    ) -> None:
        """Finetune the inflated video model on Ray Train + DeepSpeed; export it and log to MLflow."""
        over = _overrides(
            "train",
            data=data,
            output=output,
            storage_path=storage_path,
            num_workers=num_workers,
            zero_stage=zero_stage,
        )
        cfg = load_config(config, over)
        if max_steps is not None:  # --max-steps replaces the config's stop (max_steps or epochs)
            cfg.train = cfg.train.model_copy(update={"max_steps": max_steps, "epochs": None})
        _print_result(run_train(cfg))

    @app.command("pretrain-image")
    @cli_errors
    def pretrain_cmd(
        config: Path = typer.Option(
            ..., "--config", help="Workflow YAML (its pretrain: section, else defaults)."
        ),
        data: str | None = typer.Option(None, "--data", help="Clips folder (default: train.data)."),
        output: str | None = typer.Option(None, "--output", help="Where the image model package goes."),
        max_steps: int | None = typer.Option(
            None, "--max-steps", min=1, help="Optimizer steps to train for."
        ),
    ) -> None:
        """Train the 2-D image UNet on single frames (T = 1, iid noise): a base model to finetune from."""
        cfg = load_config(config)
        p = pretrain_config(cfg)
        if data is not None:
            p.train.data = data
        if output is not None:
            p.train.output = output
        if max_steps is not None:
            p.train = p.train.model_copy(update={"max_steps": max_steps, "epochs": None})
        _print_result(run_train(p, image_pretrain=True))


def _print_result(result: dict) -> None:
    console.print(
        f"done: step {result['final_step']}, model ({result['weights']} weights) at {result['model_dir']}\n"
        f"checkpoint {result['checkpoint']}\nMLflow run {result['mlflow_run_id']} at {result['tracking_uri']}"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))
