"""The run context and the workflow's one Ray (issue 12 item 1, architecture: one of each per `pyoco run`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.context import RunContext
from pyoco.config import parse_config


def test_run_context_takes_the_config_uri_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1/env")
    cfg = parse_config(
        {"mlflow": {"tracking_uri": "http://127.0.0.1:2/cfg", "experiment": "e", "registered_model": "m"}}
    )
    ctx = RunContext.from_config(cfg)
    assert (ctx.tracking_uri, ctx.experiment, ctx.registered_model) == ("http://127.0.0.1:2/cfg", "e", "m")
    assert RunContext.from_config(parse_config({})).tracking_uri == "http://127.0.0.1:1/env"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert (
        RunContext.from_config(parse_config({})).tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    # The cache identity never holds credentials.
    secret = RunContext("https://bob:hunter2@mlflow.example/x", "e", "m")
    assert "hunter2" not in json.dumps(secret.cache_identity()) and "hunter2" not in repr(
        secret.storage_options
    )


_SESSION = """
import json, ray
from pipelines.context import ensure_ray, ray_session
out = {}
with ray_session():
    out["lazy"] = ray.is_initialized()            # nothing started until a step needs Ray
    out["first_owns"] = ensure_ray(None, num_cpus=1)
    out["second_owns"] = ensure_ray(None)
    out["inside"] = ray.is_initialized()
out["after"] = ray.is_initialized()               # the session started it, so it stopped it
ray.init(num_cpus=1, include_dashboard=False)
with ray_session():
    ensure_ray(None)
out["outer_kept"] = ray.is_initialized()          # a Ray that was up before the session is left alone
ray.shutdown()
out["alone_owns"] = ensure_ray(None, num_cpus=1)  # outside a session the caller owns what it started
ray.shutdown()
print(json.dumps(out))
"""


def test_ray_session_starts_ray_once_lazily_and_stops_only_its_own():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    res = subprocess.run(
        [sys.executable, "-c", _SESSION], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {
        "lazy": False,
        "first_owns": False,
        "second_owns": False,
        "inside": True,
        "after": False,
        "outer_kept": True,
        "alone_owns": True,
    }


def test_worker_pool_setting_reaches_local_ray_unless_the_user_set_it():
    from pipelines.context import WORKER_POOL_ENV, apply_worker_pool_env

    env = apply_worker_pool_env({"PATH": "/bin"})
    assert env["RAY_idle_worker_killing_time_threshold_ms"] == "60000"
    assert set(WORKER_POOL_ENV) <= set(env)
    mine = apply_worker_pool_env({"RAY_idle_worker_killing_time_threshold_ms": "5"})
    assert mine["RAY_idle_worker_killing_time_threshold_ms"] == "5"  # the user's value wins
