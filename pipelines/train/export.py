"""The export: consolidate the final (ZeRO) checkpoint into a pyoco model package and publish it to
``train.output``."""

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

    ``text_encoder``: the encoder's ``describe()``; a CLIP encoder's weights and tokenizer are packaged too,
    and so is the model's ``vae`` (its URI, `PretrainedSpec.vae`): the package then samples, evaluates and
    serves with no reference to the pretrained folder.

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
    _check_export_target(out_uri)  # before the work, so a wrong train.output costs nothing
    vae_model = encoder = None
    if vae:
        from pyoco.model import load_vae

        vae_model = load_vae(vae, cache_dir=cfg.model.cache_dir)
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
