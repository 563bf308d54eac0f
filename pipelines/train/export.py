"""The export: a pyoco model package at ``train.output`` from the trained weights.

Training exports on its workers: at the end, every rank takes part in gathering the fp32 (EMA) weights
(:mod:`pipelines.train.gather`), rank 0 writes the package (:func:`write_package`) to
:func:`staging_uri`, and the driver moves it into place (:func:`finish_export`), so the driver never
downloads a checkpoint or any rank's optimizer state. :func:`export_checkpoint` builds the same package from
a checkpoint folder offline."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from pipelines.common import PyocoError
from pipelines.train.checkpoint import CHECKPOINT_TAG, STATE_DIR, TRAIN_STATE
from pyoco.config import PyocoConfig


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
    vae: str | None = None,
) -> dict:
    """Consolidate the checkpoint at ``ckpt_dir`` into a model package at ``out_uri``; returns its facts.

    The offline path (a checkpoint folder at hand, e.g. a run that ended before its export): training itself
    exports on the workers (:func:`write_package` from the gathered weights, then :func:`finish_export` on
    the driver), never reading optimizer shards. Arguments as for :func:`write_package`."""
    from pipelines.train.ema import consolidate, load_ema_shards

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
    from diffusers import UNet2DConditionModel

    unet_config = dict(UNet2DConditionModel.load_config(str(state_dir / "unet")))
    return write_package(
        weights,
        state,
        unet_config,
        out_uri,
        which=which,
        text_encoder=text_encoder,
        lineage=lineage,
        vae=vae,
        cache_dir=cfg.model.cache_dir,
    )


def write_package(
    weights: dict,
    state: dict,
    unet_config: dict,
    out_uri: str,
    *,
    which: str,
    text_encoder: dict,
    lineage: dict,
    vae: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Write the model package for the full fp32 ``weights`` (a VideoDenoiser state dict) at ``out_uri``;
    returns ``{"weights", "step"}``. ``state``: the checkpoint's train state (train_state.json's fields);
    ``unet_config``: the UNet's diffusers config; ``which``: "ema" or "raw".

    ``text_encoder``: the encoder's ``describe()``; a CLIP encoder's weights and tokenizer are packaged too,
    and so is the model's ``vae`` (its URI, `PretrainedSpec.vae`): the package then samples, evaluates and
    serves with no reference to the pretrained folder.

    ``out_uri`` must be absent, empty or an earlier package (see :func:`publish_package`)."""
    from diffusers import UNet2DConditionModel, UNetMotionModel

    from pyoco.model import VideoDenoiser
    from pyoco.package import PackageInfo, save_package

    cls = {"UNetMotionModel": UNetMotionModel, "UNet2DConditionModel": UNet2DConditionModel}[
        state["unet_class"]
    ]
    # .get: checkpoints written before motion branches existed have none
    model = VideoDenoiser(cls.from_config(unet_config), motion_branch=state.get("motion_branch"))
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
    _check_export_target(out_uri)  # before the work, so a wrong train.output costs nothing
    vae_model = encoder = None
    if vae:
        from pyoco.model import load_vae

        vae_model = load_vae(vae, cache_dir=cache_dir)
    if text_encoder.get("kind") == "clip":
        from pyoco.text import load_text_encoder

        encoder = load_text_encoder(text_encoder)
    with tempfile.TemporaryDirectory(prefix="pyoco-export-") as tmp:
        local = Path(tmp) / "model"
        save_package(
            local,
            model,
            scheduler_config=state["scheduler_config"],
            info=info,
            vae=vae_model,
            text_encoder=encoder,
        )
        publish_package(local, out_uri)
    return {"weights": which, "step": int(state["step"])}


def export_trained(tr) -> None:
    """The model package from the loop's final weights (``tr``: the Trainer), on the workers: every rank takes
    part in the gather (:func:`pipelines.train.gather.gather_fp32_weights`, EMA weights when EMA is on), rank 0
    writes the package (weights and configs, no optimizer state) to ``tr.plan.export_uri``."""
    import time

    from pipelines.train.checkpoint import train_state
    from pipelines.train.gather import gather_fp32_weights
    from pyoco import storage

    t0 = time.perf_counter()
    weights = gather_fp32_weights(tr.module, tr.ema, zero_stage=tr.t.zero_stage, rank=tr.rank, world=tr.world)
    if tr.rank != 0:
        return
    ckpt = storage.join(tr.t.storage_path, tr.t.run_name, f"checkpoint_{tr.step:08d}")
    write_package(
        weights,
        train_state(tr),
        dict(tr.module.unet.config),
        tr.plan.export_uri,
        which="ema" if tr.ema is not None else "raw",
        text_encoder=tr.plan.text_encoder,
        lineage={**tr.plan.lineage, "checkpoint": ckpt},
        vae=tr.plan.vae,
        cache_dir=tr.cfg.model.cache_dir,
    )
    print(
        f"pyoco: rank 0 wrote the model package for step {tr.step} to {tr.plan.export_uri} "
        f"in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )


def staging_uri(storage_path: str, run_name: str, output: str) -> str:
    """Where training's rank 0 writes the package: ``train.output`` itself when that is object storage
    (every node reaches it), else a folder beside the run's checkpoints (which Ray Train already requires
    every node to share), that :func:`finish_export` moves to ``train.output`` on the driver."""
    from pyoco import storage

    return output if storage.is_remote(output) else storage.join(storage_path, run_name, "export")


def finish_export(staged: str, out_uri: str) -> dict:
    """On the driver, after training: put the package rank 0 wrote at ``staged`` in place at ``out_uri``;
    returns ``{"weights", "step", "files"}``, ``files`` being the package files this process copied
    (weights and configs only: the driver never touches a checkpoint or its optimizer shards)."""
    import shutil

    from pyoco import storage
    from pyoco.package import PACKAGE_FILE, PackageInfo

    fs, path = storage.filesystem(staged)
    path = path.rstrip("/")
    files = sorted(f[len(path) :].lstrip("/") for f in fs.find(path)) if fs.exists(path) else []
    if PACKAGE_FILE not in files:
        raise PyocoError(f"{staged}: training wrote no model package (no {PACKAGE_FILE})")
    info = PackageInfo.from_json(json.loads(fs.cat_file(f"{path}/{PACKAGE_FILE}")), source=staged)
    if staged != out_uri:
        if storage.is_remote(staged):
            with tempfile.TemporaryDirectory(prefix="pyoco-export-") as tmp:
                fs.get(path + "/", f"{tmp}/model/", recursive=True)
                publish_package(Path(tmp) / "model", out_uri)
            fs.rm(path, recursive=True)
        else:
            publish_package(Path(path), out_uri)
            shutil.rmtree(path, ignore_errors=True)
    else:
        files = []  # already in place: rank 0 published it
    return {"weights": info.weights, "step": int(info.lineage["step"]), "files": files}


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
