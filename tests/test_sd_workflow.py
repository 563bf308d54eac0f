"""The whole workflow on the tiny SD-shaped folder (tests/sd_tiny.py): preprocess with VAE latents → train
(2 workers, ZeRO-2, no VAE in the loop) → evaluate → register → promote → in a fresh process both
``mlflow.pyfunc.load_model("models:/NAME@champion").predict`` and ``pyoco sample --model
models:/NAME@champion``; once with ε on local paths and once with v-prediction entirely from s3:// (moto:
the pretrained folder, raw videos, clips, Ray Train storage and the exported model all live in the bucket).
Plus the one-line pre-flight errors for data that does not fit the model."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
import yaml

from pyoco import clips as C
from pyoco import storage
from pyoco.storage import join
from tests.conftest import TEST_AWS_SECRET
from tests.fixtures_console import assert_quiet_run, counted_run

NUM_FRAMES = 4
PROMPT = "a red circle moves to the left"
STEPS = ["synth", "preprocess", "train", "evaluate", "register", "promote", "sample"]


def sd_workflow(root: str, pretrained: str, name: str) -> dict:
    """The workflow config with every output under ``root`` (a local folder or ``s3://bucket``)."""
    out = join(root, "out")
    return {
        "name": name,
        "output": out,
        "synth": {"out": join(out, "raw"), "videos": 4, "shards": 2, "frames": 6, "size": 32, "fps": 4},
        "preprocess": {
            "input": join(out, "raw"),
            "output": join(out, "data"),
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


def read_frames(path: Path) -> list:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def run_workflow(cfg: dict, tmp: Path, mlflow_uri: str, extra_env: dict | None = None) -> tuple[dict, str]:
    """``pyoco run`` in a fresh process, ``ray.init`` counted; returns the environment it ran with and
    the log file it wrote.

    Its console is that of a quiet run of the real steps (issue 13 item 5; test_console.py checks the
    runner's side on stub steps): a start and an end line per step, the preprocess and training progress
    lines, nothing from Ray's processes; one Ray start for preprocess, train and evaluate; the training
    workers' prints in the log file."""
    path = tmp / "wf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PYOCO_CACHE": str(tmp / "cache")}
    env.pop("RAY_ADDRESS", None)
    env.update(extra_env or {})
    run, console, ray_inits = counted_run(path, env=env)
    (tmp / "run.log").write_text(console)  # step timings, for a slow or failed run
    assert run.returncode == 0, console[-6000:]
    assert TEST_AWS_SECRET not in console
    assert ray_inits == 1, console[-3000:]
    log_file = assert_quiet_run(console, STEPS)
    assert f"train: {cfg['train']['max_steps']}/{cfg['train']['max_steps']} steps" in console, console
    videos = cfg["synth"]["videos"]
    assert f"preprocess: {videos}/{videos} videos" in console, console
    log = log_file.read_text()
    assert "pid=" in log and "pyoco: rank 0 ready" in log, log[-3000:]  # a worker's print, captured from Ray
    assert TEST_AWS_SECRET not in log
    return env, log_file


# A fresh interpreter (one for both, each a few seconds of imports): load the registered pyfunc model by
# its alias and predict one prompt, then ``pyoco sample --model models:/NAME@champion`` (3 frames) through
# the CLI, which resolves the alias again on its own.
PREDICT_THEN_SAMPLE = """
import json, sys
import mlflow.pyfunc
uri, prompt, out = sys.argv[1:4]
model = mlflow.pyfunc.load_model(uri)
videos = model.predict([prompt], params={"frames": 3, "steps": 1, "seed": 0})
print("PREDICT " + json.dumps({"shape": list(videos.shape), "dtype": str(videos.dtype)}), flush=True)
sys.argv = ["pyoco", "sample", "--model", uri, "--prompt", prompt, "--out", out, "--frames", "3", "--steps", "2"]
from pipelines.cli import main
main()
"""


def predict_and_sample_champion(name: str, out: Path, env: dict) -> tuple[dict, list]:
    """The champion's pyfunc prediction (shape, dtype) and the frames ``pyoco sample`` wrote to ``out``."""
    run = subprocess.run(
        [sys.executable, "-c", PREDICT_THEN_SAMPLE, f"models:/{name}@champion", PROMPT, str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=out.parent,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("PREDICT "))
    return json.loads(line.removeprefix("PREDICT ")), read_frames(out)


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and needle in f.read_bytes()]


def upload_folder(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.put(str(local) + "/", path + "/", recursive=True)


@pytest.mark.parametrize(("fixture", "store"), [("sd_pipeline", "local"), ("sd_pipeline_v", "s3")])
def test_sd_folder_workflow_on_latents_to_champion_sample(fixture, store, request, tmp_path, mlflow_server):
    sd = request.getfixturevalue(fixture)
    name = f"sd-{sd.prediction_type.replace('_', '-')}"
    extra_env = {}
    if store == "s3":
        bucket = request.getfixturevalue("moto_s3").make_bucket("pyoco-sd-workflow")
        root, pretrained = f"s3://{bucket}", f"s3://{bucket}/models/sd"
        upload_folder(sd.path, pretrained)
        # the run's own Ray session folder, short enough for Ray's socket paths, grepped for the secret
        ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
        extra_env["RAY_TMPDIR"] = str(ray_tmp)
    else:
        root, pretrained = str(tmp_path), str(sd.path)
    out = join(root, "out")
    env, log_file = run_workflow(sd_workflow(root, pretrained, name), tmp_path, mlflow_server.uri, extra_env)
    if store == "local":
        assert log_file.parent == tmp_path / "out" / "logs"  # next to the run's outputs

    # preprocess: CLIP's 77 x 32 token states, latents stamped with the folder's VAE identity
    from pyoco.model import load_vae
    from pyoco.vae import vae_identity

    data = join(out, "data")
    manifest = read_json(join(data, "manifest.json"))
    identity = vae_identity(load_vae(str(sd.path)))
    assert manifest["caption_embedding"]["shape"] == [sd.max_length, sd.clip_dim]
    assert manifest["latents"]["vae_identity"] == identity
    assert manifest["latents"]["vae"] == join(pretrained, "vae")
    latent = sd.pixel_size // 8
    assert manifest["latents"]["shape"] == [sd.latent_channels, NUM_FRAMES, latent, latent]
    first = storage.list_files(join(data, "clips", "train"), suffixes=(".parquet",))[0]
    shard = pq.read_table(io.BytesIO(storage.read_bytes(first)))
    assert C.latents_info(shard.schema) == ((sd.latent_channels, NUM_FRAMES, latent, latent), identity)

    # the package carries the VAE, the text encoder and the folder's prediction type
    from pyoco.package import load_package

    pkg = load_package(join(out, "model"), cache_dir=str(tmp_path / "cache"))
    assert pkg.info.has_vae and pkg.info.vae_identity == identity
    assert pkg.info.text_encoder["kind"] == "clip" and pkg.info.height == sd.pixel_size
    assert pkg.scheduler_config["prediction_type"] == sd.prediction_type

    state = read_json(join(out, "workflow", "state.json"))["steps"]
    assert state["promote"]["outputs"]["champion_version"] == state["register"]["outputs"]["version"]
    assert state["train"]["outputs"]["model_dir"] == join(out, "model")
    assert state["train"]["outputs"]["checkpoint"].startswith(join(out, "ray") + "/")

    # the champion from the registry, in fresh processes, decoded through the packaged VAE
    predicted, frames = predict_and_sample_champion(name, tmp_path / "champion.mp4", env)
    assert predicted == {"shape": [1, 3, sd.pixel_size, sd.pixel_size, 3], "dtype": "uint8"}
    assert len(frames) == 3 and frames[0].shape == (sd.pixel_size, sd.pixel_size, 3)

    # no credential reached MLflow (params, tags, artifacts: the server's db and artifact root) or Ray
    assert files_containing(mlflow_server.root, TEST_AWS_SECRET.encode()) == []
    if store == "s3":
        sessions = list(ray_tmp.glob("ray/session_*"))  # RAY_TMPDIR/ray/session_*
        assert sessions, f"the run left no Ray session under {ray_tmp}: the check would be vacuous"
        assert files_containing(ray_tmp, TEST_AWS_SECRET.encode()) == []


# ------------------------------------------------------------------------ pre-flight errors (no Ray starts)
def write_sd_clips(
    out: Path,
    *,
    dim: int,
    size: int,
    vae=None,
    num_clips: int = 4,
    split: str = "train",
    keep_frames: bool = True,
) -> Path:
    """``out/clips/SPLIT`` with ``num_clips`` rows of (77, dim) states at ``size`` px; latents from ``vae``;
    null frames without ``keep_frames`` (what ``preprocess.keep_frames: false`` writes)."""
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
            "frames": frames[i].tobytes() if keep_frames else None,
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


@pytest.mark.parametrize("case", ["minilm_clips", "other_vae_latents", "indivisible_size", "tiny_width"])
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
    elif case == "indivisible_size":
        clips = write_sd_clips(tmp_path, dim=sd.clip_dim, size=40)
        expected = "height 40 px is not divisible by 32 = UNet downsampling 4"
    else:  # a tiny model (no pretrained folder) whose cross-attention does not take MiniLM's 384-d states
        clips = write_sd_clips(tmp_path, dim=384, size=16)
        expected = "model.tiny.cross_attention_dim 128 != caption_embedding dim 384"
    model = {"pretrained": str(sd.path)}
    if case == "tiny_width":
        model = {"tiny": {"sample_size": 16, "block_out_channels": [16, 32], "cross_attention_dim": 128}}
    cfg = PyocoConfig.model_validate(
        {
            "name": "bad",
            "output": str(tmp_path / "out"),
            "model": model,
            "train": {"data": str(clips), "num_workers": 1, "batch_size_per_worker": 1, "max_steps": 1},
            "ray": {"address": "127.0.0.1:1"},  # nothing listens there: reaching Ray would fail otherwise
        }
    )
    with pytest.raises(PyocoError) as err:
        run_train(cfg)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg, msg
    if case != "tiny_width":  # the tiny model's check names the model field and both widths only
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


def test_evaluate_decodes_latents_only_clips_through_the_model_vae(
    sd_pipeline, sd_pipeline_other_vae, tmp_path
):
    """``preprocess.keep_frames: false`` (latents only): evaluate's real clips for FVD and the motion gap are
    the stored latents decoded by the package's VAE; latents from another VAE, and the pixel-only steps
    (noise fit, evaluator training), refuse with one line."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.common import PyocoError
    from pipelines.evaluate.evaluator import _read_split
    from pipelines.evaluate.noise_fit import load_val_clips
    from pipelines.evaluate.step import run_evaluate
    from pyoco import metrics as M
    from pyoco.config import EvaluateConfig
    from pyoco.model import load_vae
    from pyoco.package import load_package
    from pyoco.vae import decode_frames

    sd, model = sd_pipeline, tmp_path / "model"
    init = CliRunner().invoke(app, ["model", "init", "--out", str(model), "--pretrained", str(sd.path)])
    assert init.exit_code == 0, init.output
    pkg = load_package(str(model))
    kw = {"dim": sd.clip_dim, "size": sd.pixel_size, "num_clips": 2, "split": "val", "keep_frames": False}
    write_sd_clips(tmp_path / "data", vae=pkg.vae, **kw)
    cfg = EvaluateConfig(num_clips=1, timesteps=[500], num_videos=2, sample_steps=1, num_bootstrap=10)
    res = run_evaluate(str(model), str(tmp_path / "data"), cfg, log_to_mlflow=False)
    assert res["real_clips"] == "latents decoded by the model's VAE"
    assert res["clip_shape"] == [NUM_FRAMES, sd.pixel_size, sd.pixel_size, 3]
    stored = C.latents_tensor(C.read_clips(str(tmp_path / "data"), "val").sort_by("clip_id"))
    decoded = decode_frames(pkg.vae, stored).numpy()
    expected = float(M.frame_differences(decoded).numpy().mean())
    assert abs(res["motion"]["motion_mean_real"] - expected) <= 1e-6 * max(expected, 1.0)

    other = write_sd_clips(tmp_path / "other", vae=load_vae(str(sd_pipeline_other_vae.path)), **kw)
    refusals = {
        "evaluate": lambda: run_evaluate(str(model), str(tmp_path / "other"), cfg, log_to_mlflow=False),
        "noise fit": lambda: load_val_clips(str(tmp_path / "data"), 2),
        "evaluator train": lambda: _read_split(str(tmp_path / "data"), "val"),
    }
    for step, call in refusals.items():
        with pytest.raises(PyocoError) as err:
            call()
        msg = str(err.value)
        assert "keep_frames: false" in msg and "\n" not in msg, (step, msg)
        if step == "evaluate":
            assert f"{other}: " in msg and "the model's VAE is sha256:" in msg, msg
