"""End-to-end training on an embedded Ray (2 CPUs) with 2 Ray Train workers and DeepSpeed on CPU (gloo).

- ZeRO-2: a tiny overfit set, a real ``mlflow server`` (params, metrics, system metrics, samples, tags, config
  artifact, and no secret values anywhere), the Ray checkpoint and the exported package.
- ZeRO-3: a clean stop and resume, then a fault injected on rank 1: the run resumes from its last checkpoint (not
  from step 0) and ends at the target step; the sharded EMA is consolidated into the export.
- ``pyoco pretrain-image``: 1 worker, T = 1, iid prior, 2-D UNet export that finetuning can start from.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines import tracking
from pipelines.train.data import manifest_hash
from pipelines.train.driver import run_train
from pipelines.train.engine import build_denoiser
from pyoco.branch import BRANCH_FILE
from pyoco.config import parse_config
from pyoco.package import load_package
from tests.fault_injection import FAULT_MARKER, FaultInjection
from tests.fixtures_train import tiny_config, write_clips

SECRET = "pyoco-train-secret-7f3e9a1b2c4d"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000 and needle in f.read_bytes():
            hits.append(str(f))
    return hits


def _driver_never_opens_a_checkpoint(monkeypatch) -> None:
    """The export happens on the workers: the driver (this process) must not download a checkpoint."""
    import ray.train

    def refuse(self, *a, **kw):
        raise AssertionError(f"the driver opened checkpoint {self.path}")

    monkeypatch.setattr(ray.train.Checkpoint, "as_directory", refuse)
    monkeypatch.setattr(ray.train.Checkpoint, "to_directory", refuse)


def _only_package_files(files: list[str]) -> None:
    """What the driver copied for the export: the package's weights and configs, no optimizer state."""
    assert "pyoco_package.json" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert all(f.split("/")[0] in ("unet", "scheduler", "pyoco_package.json") for f in files), files
    assert not [f for f in files if "optim" in f or f.endswith(".pt")], files


def test_zero2_two_workers_overfit_mlflow_server_export_no_secrets(
    ray_local, mlflow_server, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    clips = write_clips(tmp_path / "data", num_clips=4, num_frames=4, size=8)
    cfg = parse_config(
        tiny_config(
            tmp_path,
            clips,
            zero_stage=2,
            max_steps=12,
            lr=3e-3,
            checkpoint_every=6,
            sample_every=12,
            ema_decay=0.9,
            caption_dropout=0.1,
            sample_seeds=[0, 1],
        )
    )
    _driver_never_opens_a_checkpoint(monkeypatch)
    res = run_train(cfg)

    # A Ray checkpoint per checkpoint_every (num_to_keep = 2), the last one at the target step.
    assert res["final_step"] == 12
    ckpt = Path(res["checkpoint"])
    assert ckpt.name == "checkpoint_00000012" and (ckpt / "ds").is_dir()
    kept = sorted(p.name for p in ckpt.parent.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000006", "checkpoint_00000012"]
    # ZeRO-2: one optimizer-state shard per rank, merged by Ray from both workers' folders.
    assert sorted(p.name for p in (ckpt / "ds").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    # Consolidated diffusers-format export, EMA weights, loadable and samplable.
    pkg = load_package(res["model_dir"])
    assert (Path(res["model_dir"]) / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert pkg.denoiser.is_video and pkg.info.weights == "ema" and res["weights"] == "ema"
    assert (pkg.info.num_frames, pkg.info.height, pkg.info.noise["kind"]) == (4, 8, "progressive")
    assert pkg.info.lineage["mlflow_run_id"] == res["mlflow_run_id"]
    assert pkg.info.lineage["checkpoint"] == res["checkpoint"]
    _only_package_files(res["export_files"])

    # MLflow: params, per-step metrics, system metrics, samples, config artifacts, tags.
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.zero_stage"] == "2" and p["noise.kind"] == "progressive" and p["train.num_workers"] == "2"
    tags = run.data.tags
    assert tags[tracking.TAG_NOISE_KIND] == "progressive" and float(tags[tracking.TAG_NOISE_ALPHA]) == 1.0
    assert tags[tracking.TAG_MANIFEST_HASH] == manifest_hash(str(clips))
    assert tags[tracking.TAG_GIT_REVISION] not in ("", None) and tags[tracking.TAG_VERSION]
    assert tags[tracking.TAG_MODEL_DIR] == res["model_dir"] and tags[tracking.TAG_EXPORT_WEIGHTS] == "ema"
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "step_time_s"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == list(range(1, 13)), key
    assert any(k.startswith("system/") for k in run.data.metrics)
    arts = tracking.artifact_texts(mlflow_server.uri, run.info.run_id)
    assert "config/resolved.yaml" in arts and "deepspeed/ds_config.json" in arts
    assert json.loads(arts["deepspeed/ds_config.json"])["zero_optimization"]["stage"] == 2
    names = {a.path for a in client.list_artifacts(run.info.run_id, "samples/step_000012")}
    assert {f"samples/step_000012/prompt00_seed{s}.{x}" for s in (0, 1) for x in ("mp4", "gif")} <= names
    # The validation samples were split across the two ranks (one (seed, prompt) item each), not rank 0's.
    prompts = json.loads(arts["samples/step_000012/prompts.json"])
    assert prompts["sampled_by"] == {"prompt00_seed0": 0, "prompt00_seed1": 1}
    mp4 = client.download_artifacts(run.info.run_id, "samples/step_000012/prompt00_seed0.mp4", str(tmp_path))
    with av.open(mp4) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4

    # The loss falls on the tiny overfit set (4 clips, 12 steps; measured ~1.1 -> ~0.5).
    loss = [v for _, v in _history(client, run.info.run_id, "loss")]
    assert sum(loss[-3:]) / 3 < 0.75 * sum(loss[:3]) / 3, loss

    # No secret value in params, tags, text artifacts, the server's store, checkpoints, the export or Ray's logs.
    blob = json.dumps([run.data.params, run.data.tags, arts])
    assert SECRET not in blob
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for root in (mlflow_server.root, tmp_path / "ray", tmp_path / "model", session / "logs"):
        assert _files_containing(root, SECRET.encode()) == [], root


def test_zero3_s3_storage_resume_after_clean_stop_then_fault_injection(
    ray_local, moto_s3, tmp_path, monkeypatch
):
    """Checkpoints, the fault marker and the run record live on S3 (moto); data and export stay local. The
    model carries the caption-conv motion branch (pyoco.branch) and draws t ~ t^2: ZeRO-3 partitions, gathers,
    checkpoints, averages (EMA) and exports the branch like the rest of the model."""
    from pyoco import storage
    from tests.conftest import TEST_AWS_SECRET

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: sqlite:///mlflow.db here
    bucket = moto_s3.make_bucket(f"pyoco-train-{tmp_path.name.lower().replace('_', '-')[:30]}")
    store = f"s3://{bucket}/ray"
    clips = write_clips(tmp_path / "data", num_clips=8, num_frames=4, size=8)
    base = {
        "zero_stage": 3,
        "checkpoint_every": 2,
        "num_to_keep": 1,
        "ema_decay": 0.5,
        "storage_path": store,
        "timestep_power": 3.0,
    }

    def config(**train):
        cfg = tiny_config(tmp_path, clips, **base, **train)
        cfg["model"]["motion_branch"] = "caption-conv"
        return parse_config(cfg)

    _driver_never_opens_a_checkpoint(monkeypatch)
    first = run_train(config(max_steps=2))
    assert first["final_step"] == 2 and first["metrics"]["attempt_start_step"] == 0
    assert (tmp_path / "mlflow.db").is_file() and first["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"

    # Same run name + storage: resumes at 2. Rank 1 dies before step 5; Ray restarts the workers from the
    # checkpoint at step 4, and the run ends at 6.
    second = run_train(
        config(max_steps=6, max_failures=1, sample_every=6),
        callbacks=[FaultInjection(at_step=5)],
    )
    assert second["final_step"] == 6
    assert second["metrics"]["attempt_start_step"] == 4  # the attempt after the crash started from step 4
    # No run_name given: both runs get the one derived from their (identical) compatibility hash.
    assert second["run_name"] == first["run_name"] and second["run_name"].startswith("t-train-")
    run = f"{store}/{second['run_name']}"
    marker = storage.read_bytes(f"{run}/{FAULT_MARKER.format(step=5)}").decode()
    assert marker.startswith("rank 1 exited at step 5")
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # one MLflow run for the whole job

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    rid = second["mlflow_run_id"]
    # Every step logged exactly once: nothing was replayed from step 0 (or from 2) after the restart.
    assert [s for s, _ in _history(client, rid, "loss")] == [1, 2, 3, 4, 5, 6]
    assert sorted({v for _, v in _history(client, rid, "resumed_from_step")}) == [2.0, 4.0]
    # One validation item, two ZeRO-3 ranks: rank 0 samples it, rank 1 runs the same forwards (they gather
    # the parameters) and drops its copy; neither waits alone.
    arts = tracking.artifact_texts(f"sqlite:///{tmp_path}/mlflow.db", rid)
    assert json.loads(arts["samples/step_000006/prompts.json"])["sampled_by"] == {"prompt00_seed0": 0}
    fs, root = storage.filesystem(run)
    assert [p.rsplit("/", 1)[1] for p in fs.ls(root) if "/checkpoint_0" in p] == ["checkpoint_00000006"]

    # ZeRO-3 export: the workers gathered the weights and the driver fetched the package from the run's
    # staging folder on S3 (weights and configs only), then removed it.
    _only_package_files(second["export_files"])
    assert not fs.exists(f"{root}/export")
    assert second["checkpoint"] == f"{run}/checkpoint_00000006"
    ckpt = tmp_path / "ckpt"
    fs.get(f"{root}/checkpoint_00000006/", str(ckpt) + "/", recursive=True)
    assert len(list((ckpt / "ds").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    assert len(list((ckpt / "pyoco").glob("ema_rank*.safetensors"))) == 2
    assert not list((ckpt / "pyoco").glob("*.pt"))  # pyoco's own state holds no pickles
    pkg = load_package(second["model_dir"])
    assert pkg.info.weights == "ema" and pkg.info.lineage["zero_stage"] == 3 and pkg.info.lineage["step"] == 6
    assert pkg.denoiser.motion_branch == "caption-conv"
    assert (Path(second["model_dir"]) / "unet" / BRANCH_FILE).is_file()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    exported = pkg.denoiser.state_dict()  # parameters + the motion modules' positional-embedding buffers
    assert set(raw) == set(exported)
    assert any(k.startswith("branches.") for k in raw)
    # EMA (decay 0.5, 6 updates) is close to, but not the same as, the last weights.
    diffs = [float((exported[k] - raw[k]).abs().max()) for k in raw]
    assert 0 < max(diffs) < 0.1
    # ...and it is exactly the EMA that the checkpoint's per-rank shards consolidate to (buffers: raw).
    from pipelines.train.ema import consolidate, load_ema_shards

    ema = consolidate(load_ema_shards(ckpt / "pyoco"))
    assert set(ema) == {n for n, _ in pkg.denoiser.named_parameters()}
    for k in raw:
        torch.testing.assert_close(exported[k], ema.get(k, raw[k]), rtol=0, atol=0)
    # The branch trained: its zero-initialised output layers moved off zero.
    assert max(float(raw[k].abs().max()) for k in raw if k.startswith("branches.") and ".conv_out." in k) > 0

    # The S3 secret reached the workers (they wrote to S3) but no log or MLflow record.
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for root_dir in (session / "logs", tmp_path):
        assert _files_containing(root_dir, TEST_AWS_SECRET.encode()) == [], root_dir


def test_pretrain_image_cli_exports_a_2d_unet_that_finetuning_inflates(ray_local, tmp_path, monkeypatch):
    from pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clips = write_clips(tmp_path / "data", num_clips=4, num_frames=4, size=8)
    cfg = tiny_config(tmp_path, clips)
    cfg["pretrain"] = {
        "data": str(clips),
        "num_workers": 1,
        "resources_per_worker": {"CPU": 0.5},
        "batch_size_per_worker": 4,
        "max_steps": 2,
        "checkpoint_every": 2,
        "sample_every": 2,
        "sample_steps": 2,
        "sample_prompts": ["a red square"],
        "prediction_type": "v_prediction",  # the shipped schedule says epsilon: export must say v
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["pretrain-image", "--config", str(path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["final_step"] == 2 and out["model_dir"] == str(tmp_path / "out" / "pretrained-image")
    pkg = load_package(out["model_dir"])
    assert not pkg.denoiser.is_video and pkg.info.num_frames == 1 and pkg.info.noise["kind"] == "iid"
    assert pkg.scheduler_config["prediction_type"] == "v_prediction"

    video_cfg = parse_config(cfg).model.model_copy(update={"pretrained": out["model_dir"]})
    model, sched = build_denoiser(video_cfg, image_pretrain=False)
    assert model.is_video and sched is not None
    # Inflation keeps the image model: per-frame outputs equal the pretrained 2-D UNet's.
    x = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = torch.randn(1, 4, 384), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), pkg.denoiser(x, t, cond), rtol=0, atol=1e-4)


def test_changed_config_never_resumes_and_a_failed_export_ends_the_run_failed(
    ray_local, tmp_path, monkeypatch
):
    """Issue 12 items 2 and 8. (a) Training whose export fails after fit ends its MLflow run FAILED, not
    RUNNING. (b) Its checkpoint refuses a resume under another alpha or worker count, in one line. (c) The
    same change without an explicit run name starts a new run from step 0 whose package and tags carry the
    new alpha."""
    from pipelines.common import PyocoError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clips = write_clips(tmp_path / "data", num_clips=4, num_frames=4, size=8)
    (tmp_path / "not-a-folder").write_text("a file where the export's parent folder should be")
    base = {
        "num_workers": 1,
        "zero_stage": 0,
        "max_steps": 2,
        "checkpoint_every": 2,
        "ema_decay": 0.9,
        "sample_every": None,
    }

    def cfg(alpha: float, **train):
        c = tiny_config(tmp_path, clips, **{**base, **train})
        c["noise"]["alpha"] = alpha
        return parse_config(c)

    # (a) fit succeeds, the export cannot write its folder: one-line error, run FAILED.
    with pytest.raises(PyocoError, match="export after training failed") as err:
        run_train(cfg(1.0, run_name="fixed", output=str(tmp_path / "not-a-folder" / "model")))
    assert "\n" not in str(err.value)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (failed,) = client.search_runs(
        [client.get_experiment_by_name("pyoco-tests").experiment_id], "attributes.run_name = 'fixed'"
    )
    assert failed.info.status == "FAILED"
    assert (tmp_path / "ray" / "fixed" / "checkpoint_00000002" / "pyoco" / "train_state.json").is_file()

    # (b) same run name, other settings: refused before any training, naming the fields.
    with pytest.raises(
        PyocoError, match=r"checkpoint_00000002: refusing to resume .*noise\.alpha 1\.0 -> 2\.0"
    ):
        run_train(cfg(2.0, run_name="fixed"))
    with pytest.raises(PyocoError, match=r"written by 1 workers, this run has train.num_workers 2"):
        run_train(cfg(1.0, run_name="fixed", num_workers=2, resources_per_worker={"CPU": 0.5}))

    # (c) no run name: alpha 2 gets its own run, trained from step 0, and everything downstream says 2.0.
    # The workflow passes its train step's cache key: the run is named after it (a changed key, a new run).
    res = run_train(cfg(2.0), run_key="0123456789abcdef-step-key")
    assert res["run_name"] == "t-train-0123456789ab"
    assert res["final_step"] == 2 and res["metrics"]["attempt_start_step"] == 0
    pkg = load_package(res["model_dir"])
    assert pkg.info.noise == {"kind": "progressive", "alpha": 2.0}
    assert float(client.get_run(res["mlflow_run_id"]).data.tags[tracking.TAG_NOISE_ALPHA]) == 2.0
    state = json.loads((Path(res["checkpoint"]) / "pyoco" / "train_state.json").read_text())
    assert state["compat"]["fields"]["noise.alpha"] == 2.0 and state["world_size"] == 1


@pytest.fixture(autouse=True)
def _quiet_ray_data(monkeypatch):
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
