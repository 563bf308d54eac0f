"""``pyoco train`` and ``pyoco pretrain-image``: Ray Train (V2 API) workers finetune the inflated video UNet with
DeepSpeed ZeRO and the PYoCo noise prior; checkpoints, resume, fault tolerance, MLflow tracking and a
consolidated diffusers export.

Over 400 lines: the driver's pre-flight checks (pretrained folder, clips, resume compatibility, CPUs)
must all run before Ray starts, and they read as one sequence with ``run_train``; the loop, checkpoint and
export already live in their own modules.

    run_train(cfg)                        # -> {"model_dir", "checkpoint", "mlflow_run_id", "final_step", ...}
    run_train(pretrain_config(cfg), image_pretrain=True)

Driver (this process): resolve the config once, read the clips' geometry, compute the null/sample caption
embeddings with the text encoder (so workers never load it), open the MLflow run (params, config artifact,
DeepSpeed config, tags), start ``TorchTrainer`` over a streaming Ray Dataset of ``clips/*.parquet``, and at the
end put the model package the workers wrote (``pyoco.package``: ``unet/`` safetensors in diffusers format,
``scheduler/``, ``pyoco_package.json``) in place at ``train.output`` (:mod:`pipelines.train.export`: the ranks
gather the fp32/EMA weights, rank 0 writes them; no optimizer shard ever reaches the driver).

Worker (:func:`pipelines.train.loop.train_loop_per_worker`, one per rank): typed config on the first line,
then the :class:`~pipelines.train.loop.Trainer` (:class:`~pipelines.train.loop.ImagePretrainer` for image
pretraining): build/load the UNet (inflated unless image pretraining) and ``deepspeed.initialize`` with the
generated config (:func:`pipelines.train.engine.setup_engine`, :mod:`pipelines.train.deepspeed`), EMA
(:mod:`pipelines.train.ema`), restore from ``ray.train.get_checkpoint()``
(:func:`pipelines.train.checkpoint.restore_checkpoint`), then the loop: stream batches
(:mod:`pipelines.train.data`), ``DiffusionLoss`` with the prior and a per-rank generator, backward/step,
checkpoint every ``checkpoint_every`` steps, and the callbacks (:mod:`pipelines.train.callbacks`: MLflow
metrics, system metrics, samples every ``sample_every`` steps, and whatever ``run_train(callbacks=...)``
adds).

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
resume: whoever can write the checkpoint bucket cannot run code on the workers. (Training's export gathers
the weights in memory and reads no checkpoint; only the offline ``export_checkpoint`` still runs DeepSpeed's
``zero_to_fp32``, which unpickles fully; see the issue-12 notes.)

Resume: Ray Train V2 restarts the worker group from the latest checkpoint after a worker failure
(``FailureConfig(max_failures)``), and a new ``pyoco train`` with the same ``storage_path`` and run name picks
up the run's latest checkpoint too. The data stream restarts at a fresh (reshuffled) epoch; model, optimizer,
LR position, EMA, step and RNG states are restored exactly.

A changed config never resumes an old run:

- the default run name carries a key of the settings (``{name}-train-{key}``): the workflow's train step key,
  or, for ``pyoco train``, the compatibility hash below; an explicit ``train.run_name`` is used as given;
- every checkpoint records a compatibility hash and its fields
  (:func:`pipelines.train.checkpoint.compat_fields`: everything that changes what is learned: model, noise,
  data hash, optimiser, batch, seed, prediction type, trained layers, and the step horizon when the LR
  schedule depends on it). Resuming from a checkpoint whose fields differ is refused with one line naming
  them, on the driver before Ray Train starts and again in each worker;
- resuming with a different ``num_workers`` is refused (ZeRO shards and per-rank RNG/EMA state are per rank).

Extending ``max_steps`` under a constant LR schedule keeps the hash (and so resumes and trains on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from pipelines.common import PyocoError, console
from pipelines.train.callbacks import Callback
from pipelines.train.checkpoint import _check_existing_checkpoints, compat_fields, compat_hash
from pipelines.train.export import _check_export_target, finish_export, staging_uri
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.plan import WorkerPlan, _abs, resolve_config, total_steps, worker_env
from pyoco.config import PyocoConfig, TrainConfig

MLFLOW_RUN_FILE = "pyoco_mlflow_run.json"


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


def _text_embeddings(cfg: PyocoConfig, geometry, spec=None) -> tuple[dict, Any, Any, Any, Any]:
    """(encoder description, null cond, null mask, sample cond, sample mask) in the data's layout, from the
    model's text encoder (``spec.text_encoder``: model.text_encoder, the pretrained folder's, or MiniLM;
    ``spec`` None: resolved from ``cfg.model``)."""
    import numpy as np

    from pyoco.pretrained import resolve_pretrained
    from pyoco.text import load_text_encoder

    spec = spec or resolve_pretrained(cfg.model)

    enc = load_text_encoder(spec.text_encoder, max_length=geometry.text_len if geometry.token_level else 32)
    if enc.dim != geometry.text_dim:
        raise PyocoError(
            f"model.text_encoder {spec.text_encoder!r} gives {enc.dim}-d states but the clips' "
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


def _check_model_fits_data(cfg: PyocoConfig, geometry):
    """The model's `PretrainedSpec`, after checking (before Ray starts, one line naming the values and fields)
    that its UNet, text encoder and VAE fit the clips: text width, pixel size, and the latents' VAE."""
    from pyoco.errors import InputError
    from pyoco.pretrained import check_compatible, resolve_pretrained

    if cfg.model.pretrained is None and cfg.model.tiny.cross_attention_dim != geometry.text_dim:
        raise PyocoError(
            f"model.tiny.cross_attention_dim {cfg.model.tiny.cross_attention_dim} != caption_embedding dim "
            f"{geometry.text_dim}"
        )
    try:
        spec = resolve_pretrained(cfg.model)
        model_identity = None
        if geometry.latents and spec.vae is not None:  # load the VAE once to hash it (CPU, float32)
            from pyoco.model import load_vae
            from pyoco.vae import vae_identity

            model_identity = vae_identity(load_vae(spec.vae, cache_dir=cfg.model.cache_dir))
        check_compatible(
            spec,
            clip_text_dim=geometry.text_dim,
            height=geometry.height,
            width=geometry.width,
            latents_vae_identity=geometry.vae_identity,
            model_vae_identity=model_identity,
            data=f"train.data {cfg.train.data}",
        )
    except InputError as err:
        raise PyocoError(str(err)) from None
    return spec


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
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train (or image-pretrain) as ``cfg`` says; returns ``{"model_dir", "checkpoint", "mlflow_run_id",
    "final_step", "weights", "metrics", ...}``. ``model_dir`` is the exported model package.

    ``ctx`` (a :class:`pipelines.context.RunContext`) gives the MLflow server and experiment (default: from
    ``cfg.mlflow`` and the environment). ``run_key`` (the workflow step's cache key) names the Ray Train run
    when ``train.run_name`` is unset; without it the compatibility hash does. ``callbacks`` run in every
    worker's loop after the default ones (:mod:`pipelines.train.callbacks`; the tests' fault injection)."""
    from pipelines import tracking
    from pipelines.train.data import DataError, inspect_clips, manifest_hash
    from pipelines.train.deepspeed import deepspeed_config

    if not (image_pretrain or cfg.train.image_pretrain) and cfg.noise.is_auto:
        raise PyocoError(
            "noise.kind/noise.alpha 'auto' is fitted by `pyoco run` (its noise_fit step); for `pyoco train`, "
            "run `pyoco noise fit` and set the values it prints"
        )
    cfg = resolve_config(cfg, image_pretrain=image_pretrain)  # image pretraining: the iid prior, all layers
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
    spec = _check_model_fits_data(cfg, geometry)
    steps, per_epoch = total_steps(t, geometry.num_rows, t.num_workers)
    mhash = manifest_hash(t.data)
    compat = compat_fields(cfg, geometry, total=steps, data_hash=mhash)
    t.run_name = t.run_name or f"{cfg.name}-{kind}-{(run_key or compat_hash(compat))[:12]}"
    resume_step = _check_existing_checkpoints(t, compat)
    _check_export_target(t.output)  # before training: rank 0 may write straight to it
    ds_config = deepspeed_config(t, world_size=t.num_workers)
    text_desc, null, null_mask, sample_cond, sample_mask = _text_embeddings(cfg, geometry, spec)

    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.console import TrainProgress

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
            env=forwarded,
            compat=compat,
            credential_names=credential_names,
            vae=spec.vae,
            export_uri=staging_uri(t.storage_path, t.run_name, t.output),
            text_encoder=text_desc,
            lineage={
                "mlflow_run_id": run_id,
                "data_manifest_hash": mhash,
                "git_revision": tracking.git_revision(),
                "kind": kind,
            },
            callbacks=tuple(callbacks),
        )
        # The driver's progress line, fed by the workers' ray.train.report (pipelines.context)
        progress = TrainProgress(kind, steps, start_step=resume_step or 0)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=dataclasses.asdict(plan) | {"env": plan.env, "callbacks": plan.callbacks},
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
                callbacks=[progress.callback],
            ),
            datasets={"train": dataset},
        )
        console.print(
            f"{kind}: {t.num_workers} worker(s), ZeRO-{t.zero_stage}, {steps} steps, "
            f"clips {geometry.num_frames}x{geometry.height}x{geometry.width} from {t.data}; run {t.run_name}"
            + (f" (resuming from step {resume_step})" if resume_step is not None else ""),
            soft_wrap=True,  # one line however narrow the terminal (the data URI can be long)
        )
        t0 = time.perf_counter()
        try:
            with progress:
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
            # The workers gathered the weights and rank 0 wrote the package (Trainer.export); the driver
            # only moves it into place and never reads the checkpoint's optimizer shards.
            exported = finish_export(plan.export_uri, t.output)
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
            "export_files": exported["files"],
            "run_name": t.run_name,
            "storage_path": t.storage_path,
            "metrics": metrics,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        if started:
            ray.shutdown()
