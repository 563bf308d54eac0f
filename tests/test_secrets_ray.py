"""Credentials never travel by value in Ray task or actor arguments (issue 12, item 7): task specs and the
serialized map functions live in Ray's control plane and object store, which spills to disk. Real runs on
the session's embedded Ray against moto S3; the driver holds a distinctive secret that must not show up in
what Ray serializes (watched with Ray's own custom-serializer hook, which still serializes the objects
normally) or anywhere in the Ray session folder, while the workers reach S3 with the credentials of their
own environment (the session Ray was started with moto's test credentials, as nodes have theirs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pyoco import storage

DRIVER_SECRET = "pyoco-driver-only-secret-5b8c2e71"
DRIVER_PASSWORD = "pyoco-driver-only-password-9d4f"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [
        str(f)
        for f in root.rglob("*")
        if f.is_file() and f.stat().st_size < 50_000_000 and needle in f.read_bytes()
    ]


class _Watch:
    """Record every instance of ``cls`` that Ray serializes (task/actor arguments, put objects), as the
    plain state it would ship; the objects are rebuilt unchanged on the other side."""

    def __init__(self, ray, cls, state, rebuild):
        self.ray, self.cls, self.seen = ray, cls, []

        def serializer(obj):
            data = state(obj)
            self.seen.append(data)
            return data

        ray.util.register_serializer(cls, serializer=serializer, deserializer=rebuild)

    def close(self) -> None:
        self.ray.util.deregister_serializer(self.cls)


def _session_dir(ray) -> Path:
    return Path(ray._private.worker._global_node.get_session_dir_path())


def test_preprocess_ships_no_credentials_to_ray_tasks(ray_local, moto_s3, monkeypatch, tmp_path):
    from pipelines.cli import app

    ray = ray_local
    bucket = moto_s3.make_bucket(f"pyoco-secret-{tmp_path.name.lower().replace('_', '-')[:30]}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DRIVER_SECRET)  # moto accepts any secret
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["data", "synth", "--out", f"s3://{bucket}/raw", "--videos", "6", "--shards", "2"]
        + ["--frames", "8", "--size", "16"],
    )
    assert res.exit_code == 0, res.output
    watch = _Watch(ray, storage.StorageOptions, dataclasses.asdict, lambda d: storage.StorageOptions(**d))
    try:
        res = runner.invoke(
            app,
            [
                "preprocess",
                "--input",
                f"s3://{bucket}/raw",
                "--output",
                f"s3://{bucket}/out",
                "--no-progress",
            ],
        )
    finally:
        watch.close()
    assert res.exit_code == 0, res.output
    manifest = json.loads(storage.read_bytes(f"s3://{bucket}/out/manifest.json"))
    assert manifest["clips_written"] > 0  # the workers read and wrote S3 with their own credentials
    assert watch.seen, "no StorageOptions went through Ray's serializer: the check would be vacuous"
    for opts in watch.seen:
        assert opts["secret"] is None and opts["key"] is None and opts["token"] is None, opts
        assert opts["endpoint_url"] == moto_s3.endpoint_url  # settings still travel
    assert _files_containing(_session_dir(ray), DRIVER_SECRET.encode()) == []


def test_train_ships_credential_names_not_values(ray_local, moto_s3, monkeypatch, tmp_path):
    """Ray Train with checkpoints on S3: neither the train-loop config nor the storage filesystem that
    Ray pickles to the controller and workers carries the driver's AWS secret or MLflow password."""
    import s3fs

    from pipelines.train.driver import run_train
    from pipelines.train.plan import SecretEnv
    from pyoco.config import parse_config
    from tests.fixtures_train import tiny_config, write_clips

    ray = ray_local
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DRIVER_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", DRIVER_PASSWORD)  # unused by sqlite; must not travel
    bucket = moto_s3.make_bucket(f"pyoco-secret-t-{tmp_path.name.lower().replace('_', '-')[:28]}")
    clips = write_clips(tmp_path / "data", num_clips=4, num_frames=4, size=8)
    cfg = parse_config(
        tiny_config(
            tmp_path, clips, max_steps=2, checkpoint_every=2, num_workers=1, storage_path=f"s3://{bucket}/ray"
        )
    )
    envs = _Watch(ray, SecretEnv, dict, SecretEnv)
    s3 = _Watch(ray, s3fs.S3FileSystem, lambda fs: dict(fs.storage_options), lambda d: s3fs.S3FileSystem(**d))
    try:
        result = run_train(cfg)
    finally:
        envs.close()
        s3.close()
    assert result["final_step"] == 2
    assert result["checkpoint"].startswith(f"s3://{bucket}/ray/")  # the workers wrote the checkpoint to S3
    assert envs.seen and s3.seen, "nothing went through Ray's serializer: the check would be vacuous"
    shipped = json.dumps([envs.seen, s3.seen], default=str)
    for value in (DRIVER_SECRET, DRIVER_PASSWORD):
        assert value not in shipped
    for env in envs.seen:
        assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD"} & set(env), env
    for root in (_session_dir(ray), tmp_path):
        assert _files_containing(root, DRIVER_SECRET.encode()) == [], root
        assert _files_containing(root, DRIVER_PASSWORD.encode()) == [], root


@pytest.mark.parametrize("have", [True, False])
def test_worker_env_sends_names_and_the_worker_reports_missing_ones(monkeypatch, have):
    from pipelines.train.plan import apply_worker_env, worker_env

    env = {
        "AWS_SECRET_ACCESS_KEY": DRIVER_SECRET,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "PYOCO_CACHE": "/c",
    }
    values, names = worker_env(env)
    assert dict(values) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "PYOCO_CACHE": "/c"}
    assert names == ("AWS_SECRET_ACCESS_KEY",) and DRIVER_SECRET not in repr((values, names))
    if have:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-node-own-secret")
    else:
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("PYOCO_CACHE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://node-own:1")
    assert apply_worker_env(values, names) == ([] if have else ["AWS_SECRET_ACCESS_KEY"])
    import os

    assert os.environ["AWS_ENDPOINT_URL"] == "http://node-own:1"  # the node's own setting wins
    assert os.environ["PYOCO_CACHE"] == "/c"
    monkeypatch.delenv("PYOCO_CACHE")
