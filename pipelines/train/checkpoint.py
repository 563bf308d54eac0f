"""Checkpoint state beside DeepSpeed's: the layout names, the compatibility hash that keeps a changed config
from resuming an old run, and the per-rank RNG states (safetensors, never pickled)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pipelines.common import PyocoError
from pipelines.train.plan import _join
from pyoco.config import PyocoConfig, TrainConfig

CHECKPOINT_TAG = "ds"
STATE_DIR = "pyoco"
TRAIN_STATE = "train_state.json"


# ========================================================================================= compatibility
# Settings that do not change what is learned, left out of the compatibility hash: where things go, how often
# to log/checkpoint/sample, retries, worker resources, and the stopping point (except as the
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
            listing = fs.ls(root, detail=True, **({"refresh": True} if storage.is_remote(run_uri) else {}))
        except FileNotFoundError:
            return None
        latest = None
        # Folders only: Ray Train also writes files named checkpoint_* (checkpoint_manager_snapshot.json) into
        # the run folder, and reading one as a checkpoint failed every rerun of a finished run.
        folders = (e["name"] for e in listing if e.get("type") == "directory")
        for name in sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in folders):
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


# ========================================================================================= checkpoint I/O
# A rank's side of a checkpoint, for the loop's Trainer (``tr``: its engine, EMA, noise generator, step).
def train_state(tr) -> dict:
    """train_state.json: what a resume checks and what the package is built from."""
    return {
        "step": tr.step,
        "zero_stage": tr.t.zero_stage,
        "world_size": tr.world,
        "image_pretrain": tr.t.image_pretrain,
        "unet_class": type(tr.module.unet).__name__,
        "motion_branch": tr.module.motion_branch,
        "ema": tr.ema is not None,
        "ema_decay": tr.t.ema_decay,
        "trainable": tr.trainable_names,
        "geometry": tr.plan.geometry,
        "scheduler_config": tr.scheduler_config,
        "noise": {"kind": tr.prior.kind, "alpha": tr.prior.alpha},
        "mlflow_run_id": tr.plan.run_id,
        "compat": {"hash": compat_hash(tr.plan.compat), "fields": tr.plan.compat},
    }


def _rng_file(state_dir: Path, rank: int) -> Path:
    return state_dir / f"rng_rank{rank:03d}.safetensors"


def restore_checkpoint(tr) -> int | None:
    """Load Ray's checkpoint into ``tr`` (engine, optimizer, LR schedule, EMA, RNG) after checking it was
    written by this config and world size; returns its step (None: no checkpoint, a fresh start).

    Nothing here runs code from the checkpoint: our own state (RNG, EMA, train_state.json) holds no
    pickles, and DeepSpeed's ``ds/`` files are read with ``weights_only=True``
    (:func:`pipelines.train.deepspeed.use_weights_only_loading`; DeepSpeed 0.19's ``load_checkpoint`` has no
    such argument)."""
    import ray.train

    from pipelines.train.deepspeed import use_weights_only_loading
    from pipelines.train.ema import ema_file, load_ema_state

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        root = Path(d)
        state_dir = root / STATE_DIR
        state_file = state_dir / TRAIN_STATE
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        check_resume(state, tr.plan.compat, tr.world, where=str(ckpt.path))
        use_weights_only_loading(tr.engine)
        path, client_state = tr.engine.load_checkpoint(
            str(root), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"{ckpt.path}: no DeepSpeed checkpoint under tag {CHECKPOINT_TAG!r}")
        step = int(client_state["step"])
        if tr.ema is not None:
            tr.ema.load_state_dict(load_ema_state(ema_file(state_dir, tr.rank if tr.ema.zero3 else 0)))
        if _rng_file(state_dir, tr.rank).exists():
            load_rng_state(_rng_file(state_dir, tr.rank), tr.generator)
    if tr.rank == 0:
        print(f"pyoco: resumed from step {step} ({ckpt.path})", flush=True)
    return step


def save_checkpoint(tr, metrics: dict) -> None:
    """Every rank writes its part of the checkpoint at ``tr.step``; Ray merges the folders into one
    checkpoint in storage (``ray.train.report`` is collective: every rank calls it)."""
    import tempfile

    import ray.train

    from pipelines.train.ema import ema_file, save_ema_state

    with tempfile.TemporaryDirectory(prefix="pyoco-ckpt-") as tmp:
        root = Path(tmp)
        tr.engine.save_checkpoint(str(root), tag=CHECKPOINT_TAG, client_state={"step": tr.step})
        state_dir = root / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        save_rng_state(_rng_file(state_dir, tr.rank), tr.generator)
        if tr.ema is not None and (tr.ema.zero3 or tr.rank == 0):
            save_ema_state(tr.ema.state_dict(), ema_file(state_dir, tr.rank))
        if tr.rank == 0:
            tr.module.unet.save_config(str(state_dir / "unet"))
            (state_dir / TRAIN_STATE).write_text(json.dumps(train_state(tr), indent=2, default=str))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{tr.step:08d}",
        )
