"""`pyoco run` end to end on embedded defaults: every step for real, then caching, --from and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "wf-test",
    "synth": {"videos": 4, "shards": 2, "frames": 6, "size": 16, "fps": 4},
    "preprocess": {
        "num_frames": 4,
        "size": 16,
        "max_clips_per_video": 1,
        "rows_per_file": 8,
        "videos_per_task": 2,
        "val_fraction": 0.34,  # of the 4 videos, key 00000003 (score 0.315) is held out for evaluate
        "captions": {"dedupe": "none"},
    },
    "model": {"tiny": {"sample_size": 16, "block_out_channels": [16, 32]}, "train_layers": "all"},
    "noise": {"kind": "progressive", "alpha": 1.0},
    "train": {
        "num_workers": 1,
        "resources_per_worker": {"CPU": 1},
        "zero_stage": 0,
        "batch_size_per_worker": 2,
        "max_steps": 2,
        "checkpoint_every": 2,
        "ema_decay": None,
        "sample_every": None,
    },
    "evaluate": {
        "num_clips": 2,
        "timesteps": [100, 900],
        "num_videos": 4,
        "sample_steps": 1,
    },
    "mlflow": {"experiment": "wf-test", "registered_model": "wf-test"},
    "sample": {"num_frames": 4, "steps": 1},
}


def _write(tmp: Path, cfg: dict) -> Path:
    out = tmp / "out"
    cfg = json.loads(json.dumps(cfg))
    cfg["output"] = str(out)
    cfg["synth"]["out"] = str(out / "raw")
    cfg["preprocess"]["input"] = str(out / "raw")
    cfg["preprocess"]["output"] = str(out / "data")
    path = tmp / "wf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg_path: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--config", str(cfg_path), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cfg_path.parent,
    )


def _state(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "workflow" / "state.json").read_text())["steps"]


def test_workflow_runs_caches_and_resumes(tmp_path):
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")

    # 1. A failing step stops the workflow with one line; earlier steps are kept.
    broken = json.loads(json.dumps(TINY))
    broken["train"]["max_steps"] = 2
    broken["model"]["tiny"]["cross_attention_dim"] = 128  # does not match the 384-d caption embeddings
    path = _write(tmp_path, broken)
    first = _run(path, env=env)
    assert first.returncode == 1, first.stderr[-2000:]
    assert (
        "error: step train failed: model.tiny.cross_attention_dim 128 != caption_embedding dim 384"
        in first.stderr
    )
    st = _state(tmp_path)
    assert st["preprocess"]["status"] == "done" and st["train"]["status"] == "failed"

    # 2. Fixed: resumes at train (synth and preprocess skipped by their keys) and finishes with a champion.
    path = _write(tmp_path, TINY)
    second = _run(path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "synth: unchanged" in log and "preprocess: unchanged" in log
    st = _state(tmp_path)
    assert all(st[s]["status"] == "done" for s in ("train", "evaluate", "register", "promote", "sample"))
    assert st["promote"]["outputs"]["champion_version"] == st["register"]["outputs"]["version"]
    assert (tmp_path / "out" / "sample.mp4").stat().st_size > 0
    manifest = json.loads((tmp_path / "out" / "data" / "manifest.json").read_text())
    assert manifest["inputs"] == manifest["accepted_videos"] + sum(manifest["rejected"].values())

    # 3. Re-run: every step unchanged and skipped.
    third = _run(path, env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    for step in ("synth", "preprocess", "train", "evaluate", "register", "promote", "sample"):
        assert f"{step}: unchanged" in third.stdout + third.stderr, step

    # 4. --only with an unknown step is a one-line error.
    bad = _run(path, "--only", "deploy", env=env)
    assert bad.returncode == 2 and "unknown step" in bad.stderr and "Traceback" not in bad.stderr

    # 5. MLflow mirrors the workflow: parent runs with one nested run per step.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("wf-test")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = {r.info.run_id for r in runs if r.data.tags.get("pyoco.workflow") == "wf-test"}
    steps = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents and "pyoco.step" in r.data.tags
    ]
    assert {r.data.tags["pyoco.step"] for r in steps} >= {
        "synth",
        "preprocess",
        "train",
        "evaluate",
        "sample",
    }
    assert any(r.data.tags["pyoco.step.status"] == "skipped" for r in steps)


def test_workflow_uses_the_mlflow_server_from_the_yaml_and_a_changed_alpha_retrains(tmp_path, mlflow_server):
    """Issue 12 items 1 and 2. The tracking URI is set in the YAML only (no MLFLOW_TRACKING_URI): every step
    (train, evaluate, register, promote, sample) uses that `mlflow server`, and nothing lands in a local
    store. Then noise.alpha changes: train starts a new run from step 0 (not a resume of the finished one), and
    the package, the evaluation and the registered version all carry alpha 2.0."""
    import os

    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    name = f"wf-server-{tmp_path.name[-20:]}".replace("_", "-")
    cfg = json.loads(json.dumps(TINY))
    cfg["mlflow"] = {"tracking_uri": mlflow_server.uri, "experiment": name, "registered_model": name}
    first = _run(_write(tmp_path, cfg), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    st = _state(tmp_path)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == st["register"]["outputs"]["version"] == "1"
    train_run = client.get_run(st["train"]["outputs"]["mlflow_run_id"])
    assert "eval.val_loss" in train_run.data.metrics  # evaluate logged into the training run, on the server
    assert champion.run_id == train_run.info.run_id  # register logged the pyfunc into that run
    assert champion.tags["pyoco.data_manifest_hash"] == st["preprocess"]["outputs"]["manifest_hash"]
    assert train_run.data.tags["pyoco.data_manifest_hash"] == st["preprocess"]["outputs"]["manifest_hash"]
    assert client.get_experiment_by_name(name) is not None
    # Nothing in the local default stores (sqlite in the working folder, or ./mlruns).
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert (tmp_path / "out" / "sample.mp4").stat().st_size > 0

    cfg["noise"]["alpha"] = 2.0
    second = _run(_write(tmp_path, cfg), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    st2 = _state(tmp_path)
    train = st2["train"]["outputs"]
    assert train["run_name"] != st["train"]["outputs"]["run_name"]
    assert train["metrics"]["attempt_start_step"] == 0 and train["final_step"] == 2  # trained, not resumed
    package = json.loads((Path(train["model_dir"]) / "pyoco_package.json").read_text())
    assert package["noise"]["alpha"] == 2.0
    assert st2["evaluate"]["outputs"]["metrics"]["noise"]["alpha"] == 2.0
    v2 = client.get_model_version(name, st2["register"]["outputs"]["version"])
    assert v2.version == "2" and float(v2.tags["pyoco.noise_alpha"]) == 2.0
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_workflow_trains_the_evaluator_and_fits_noise_auto_before_train(tmp_path):
    """Issue 10 (the workflow trains the evaluator; evaluate and the gate use it) and issue 11 (``noise:
    {kind: auto, alpha: auto}`` runs the noise fit with the pretrained image model as a cached step, and train
    uses what it found)."""
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    cfg = json.loads(json.dumps(TINY))
    cfg["name"] = cfg["mlflow"]["experiment"] = cfg["mlflow"]["registered_model"] = "wf-auto"
    cfg["synth"]["videos"] = 8  # keys 00000003 and 00000006 are held out at 0.34: 6 train, 2 val
    cfg["noise"] = {"kind": "auto", "alpha": "auto", "fit_clips": 2, "fit_steps": 2}
    cfg["pretrain"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "zero_stage": 0, "max_steps": 2,
                       "batch_size_per_worker": 2, "checkpoint_every": 2, "ema_decay": None}  # fmt: skip
    cfg["evaluator"] = {"labels": ["color", "direction"], "steps": 5, "size": 16}
    cfg["evaluate"]["num_videos"] = 32  # FVD's minimum
    path = _write(tmp_path, cfg)
    res = _run(path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    st = _state(tmp_path)
    order = [
        s for s in ("preprocess", "evaluator", "pretrain", "noise_fit", "train") if st[s]["status"] == "done"
    ]
    assert order == ["preprocess", "evaluator", "pretrain", "noise_fit", "train"]
    fit = st["noise_fit"]["outputs"]
    assert fit["kind"] in ("mixed", "progressive") and fit["alpha"] >= 0
    report = json.loads((tmp_path / "out" / "noise_fit" / "fit.json").read_text())
    assert report["num_clips"] == 2 and report["fit"]["kind"] == fit["kind"]
    assert (tmp_path / "out" / "noise_fit" / "fit.png").is_file()
    # train used the fitted prior: the package records it, and register tags the version with it
    pkg = json.loads((Path(st["train"]["outputs"]["model_dir"]) / "pyoco_package.json").read_text())
    assert pkg["noise"]["kind"] == fit["kind"] and pkg["noise"]["alpha"] == pytest.approx(
        fit["alpha"], abs=1e-3
    )
    metrics = st["evaluate"]["outputs"]["metrics"]
    assert "fvd" in json.dumps(metrics) and st["evaluator"]["outputs"]["path"].endswith(".pt")
    # re-run: the evaluator and the fit are cached like every other step
    again = _run(path, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "evaluator: unchanged" in again.stdout + again.stderr
    assert "noise_fit: unchanged" in again.stdout + again.stderr
