"""The whole workflow on the tiny SD-shaped folder (tests/sd_tiny.py): preprocess with VAE latents → train
(2 workers, ZeRO-2, no VAE in the loop) → evaluate → register → promote → ``pyoco sample --model
models:/NAME@champion`` in a fresh process; once with ε and once with v-prediction. Plus the one-line
pre-flight errors for data that does not fit the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
import yaml

from pyoco import clips as C

NUM_FRAMES = 4


def sd_workflow(tmp: Path, pretrained: str, name: str) -> dict:
    out = tmp / "out"
    return {
        "name": name,
        "output": str(out),
        "synth": {"out": str(out / "raw"), "videos": 4, "shards": 2, "frames": 6, "size": 32, "fps": 4},
        "preprocess": {
            "input": str(out / "raw"),
            "output": str(out / "data"),
            "num_frames": NUM_FRAMES,
            "size": 32,
            "val_fraction": 0.34,
            "captions": {"dedupe": "none"},
            "latents": True,
        },
        "model": {"pretrained": pretrained, "train_layers": "all", "motion_num_attention_heads": 1},
        "noise": {"kind": "progressive", "alpha": 1.0},
        "train": {
            "num_workers": 2,
            "resources_per_worker": {"CPU": 0.5},
            "zero_stage": 2,
            "batch_size_per_worker": 1,
            "max_steps": 2,
            "checkpoint_every": 2,
            "ema_decay": None,
            "sample_every": None,
        },
        "evaluate": {"num_clips": 1, "timesteps": [100, 900], "num_videos": 2, "sample_steps": 1},
        "mlflow": {"experiment": name, "registered_model": name},
        "sample": {"num_frames": NUM_FRAMES, "steps": 1},
    }


def run_cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cwd,
    )


def read_frames(path: Path) -> list:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def run_workflow(cfg: dict, tmp: Path, mlflow_uri: str) -> dict:
    """``pyoco run`` in a fresh process; returns the workflow state's steps."""
    path = tmp / "wf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("RAY_ADDRESS", None)
    run = run_cli("run", "--config", str(path), env=env, cwd=tmp)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return env


def sample_champion(name: str, out: Path, env: dict) -> list:
    """``pyoco sample --model models:/NAME@champion`` (3 frames) in a fresh process; the decoded frames."""
    sample = run_cli(
        "sample",
        "--model",
        f"models:/{name}@champion",
        "--prompt",
        "a red circle moves to the left",
        "--out",
        str(out),
        "--frames",
        "3",
        "--steps",
        "2",
        env=env,
        cwd=out.parent,
    )
    assert sample.returncode == 0, sample.stdout[-2000:] + sample.stderr[-2000:]
    return read_frames(out)


@pytest.mark.parametrize("fixture", ["sd_pipeline", "sd_pipeline_v"])
def test_sd_folder_workflow_on_latents_to_champion_sample(fixture, request, tmp_path, mlflow_server):
    sd = request.getfixturevalue(fixture)
    name = f"sd-{sd.prediction_type.replace('_', '-')}"
    env = run_workflow(sd_workflow(tmp_path, str(sd.path), name), tmp_path, mlflow_server.uri)

    # preprocess: CLIP's 77 x 32 token states, latents stamped with the folder's VAE identity
    from pyoco.model import load_vae
    from pyoco.vae import vae_identity

    data = tmp_path / "out" / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    identity = vae_identity(load_vae(str(sd.path)))
    assert manifest["caption_embedding"]["shape"] == [sd.max_length, sd.clip_dim]
    assert manifest["latents"]["vae_identity"] == identity
    latent = sd.pixel_size // 8
    assert manifest["latents"]["shape"] == [sd.latent_channels, NUM_FRAMES, latent, latent]
    shard = pq.read_table(sorted((data / "clips" / "train").glob("*.parquet"))[0])
    assert C.latents_info(shard.schema) == ((sd.latent_channels, NUM_FRAMES, latent, latent), identity)

    # the package carries the VAE, the text encoder and the folder's prediction type
    from pyoco.package import load_package

    pkg = load_package(str(tmp_path / "out" / "model"))
    assert pkg.info.has_vae and pkg.info.vae_identity == identity
    assert pkg.info.text_encoder["kind"] == "clip" and pkg.info.height == sd.pixel_size
    assert pkg.scheduler_config["prediction_type"] == sd.prediction_type

    state = json.loads((tmp_path / "out" / "workflow" / "state.json").read_text())["steps"]
    assert state["promote"]["outputs"]["champion_version"] == state["register"]["outputs"]["version"]

    # the champion from the registry, in a fresh process, decoded through the packaged VAE
    frames = sample_champion(name, tmp_path / "champion.mp4", env)
    assert len(frames) == 3 and frames[0].shape == (sd.pixel_size, sd.pixel_size, 3)


# ------------------------------------------------------------------------ pre-flight errors (no Ray starts)
def write_sd_clips(
    out: Path, *, dim: int, size: int, vae=None, num_clips: int = 4, split: str = "train"
) -> Path:
    """``out/clips/SPLIT`` with ``num_clips`` rows of (77, dim) states at ``size`` px; latents from ``vae``."""
    import numpy as np

    from pyoco.vae import encode_frames, vae_identity
    from tests.fixtures_train import clip_frames

    frames = np.stack([clip_frames(i, NUM_FRAMES, size) for i in range(num_clips)])
    latents = encode_frames(vae, frames).numpy() if vae is not None else None
    rows = [
        {
            "clip_id": f"clip{i:04d}",
            "source": "fixture",
            "key": f"video{i:04d}",
            "clip_index": 0,
            "start_frame": 0,
            "num_frames": NUM_FRAMES,
            "fps": 8.0,
            "height": size,
            "width": size,
            "frames": frames[i].tobytes(),
            "caption": "a red circle",
            C.EMBEDDING: np.zeros((77, dim), np.float32),
            C.MASK: [True] * 77,
            "labels": None,
            "node_id": "fixture",
            **({C.LATENTS: latents[i]} if latents is not None else {}),
        }
        for i in range(num_clips)
    ]
    clips = out / "clips" / split
    clips.mkdir(parents=True)
    C.write_clip_table(
        rows, str(clips / "part-0.parquet"), vae_identity=vae_identity(vae) if vae is not None else None
    )
    return clips


@pytest.mark.parametrize("case", ["minilm_clips", "other_vae_latents", "indivisible_size"])
def test_data_that_does_not_fit_the_sd_model_fails_before_ray(
    case, sd_pipeline, sd_pipeline_other_vae, tmp_path
):
    from pipelines.common import PyocoError
    from pipelines.train.driver import run_train
    from pyoco.config import PyocoConfig
    from pyoco.model import load_vae

    sd = sd_pipeline
    if case == "minilm_clips":
        clips = write_sd_clips(tmp_path, dim=384, size=sd.pixel_size)
        expected = "caption_embedding width 384 != the text encoder's width 32"
    elif case == "other_vae_latents":
        clips = write_sd_clips(
            tmp_path, dim=sd.clip_dim, size=sd.pixel_size, vae=load_vae(str(sd_pipeline_other_vae.path))
        )
        expected = "latents were made by VAE sha256:"
    else:
        clips = write_sd_clips(tmp_path, dim=sd.clip_dim, size=40)
        expected = "height 40 px is not divisible by 32 = UNet downsampling 4"
    cfg = PyocoConfig.model_validate(
        {
            "name": "bad",
            "output": str(tmp_path / "out"),
            "model": {"pretrained": str(sd.path)},
            "train": {"data": str(clips), "num_workers": 1, "batch_size_per_worker": 1, "max_steps": 1},
            "ray": {"address": "127.0.0.1:1"},  # nothing listens there: reaching Ray would fail otherwise
        }
    )
    with pytest.raises(PyocoError) as err:
        run_train(cfg)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg, msg
    assert f"train.data {clips}" in msg


def test_validation_loss_reads_stored_latents_like_online_encoding(sd_pipeline, tmp_path):
    """evaluate's val loss on the clips' float16 latents equals the loss on frames encoded by the packaged
    VAE (same clips, noise and timesteps), to float16 rounding."""
    import dataclasses

    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.evaluate.metrics import load_eval_clips, validation_loss
    from pyoco.noise import make_prior
    from pyoco.package import load_package

    model = tmp_path / "model"
    init = CliRunner().invoke(
        app, ["model", "init", "--out", str(model), "--pretrained", str(sd_pipeline.path)]
    )
    assert init.exit_code == 0, init.output
    pkg = load_package(str(model))
    write_sd_clips(
        tmp_path / "data", dim=sd_pipeline.clip_dim, size=sd_pipeline.pixel_size, vae=pkg.vae, split="val"
    )
    clips = load_eval_clips(str(tmp_path / "data"), None, embed_dim=sd_pipeline.clip_dim)
    assert clips.latents is not None and clips.latents_vae == pkg.info.vae_identity
    prior = make_prior("progressive", 1.0)
    kw = {"timesteps": [100, 900], "seed": 0}
    stored = validation_loss(pkg, clips, prior, **kw)
    online = validation_loss(pkg, dataclasses.replace(clips, latents=None, latents_vae=None), prior, **kw)
    other = validation_loss(pkg, dataclasses.replace(clips, latents=clips.latents * 0 + 3.0), prior, **kw)
    for t in stored:
        assert abs(stored[t] - online[t]) <= 2e-3 * online[t], (t, stored[t], online[t])
        assert abs(other[t] - online[t]) > 1e-2 * online[t]  # the stored latents are really what is read
