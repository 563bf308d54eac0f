"""The registry flow against a real `mlflow server`: evaluate -> register (challenger) -> promote (champion)
-> a worse version is refused -> --force -> rollback -> sample from @champion; the pyfunc model loads and
predicts in a fresh process; bad input is a one-line error with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipelines.common import PyocoError
from pipelines.registry.client import _client
from pipelines.registry.resolve import resolve_model_uri
from pipelines.registry.transaction import read_state
from tests.fixtures_registry import TINY_SIZE, make_clips_dir

pytest_plugins = ("tests.fixtures_registry",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREDICT_IN_FRESH_PROCESS = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
videos = model.predict(["a red circle moves to the left"], params={"frames": 3, "steps": 2, "seed": 1})
print(json.dumps({"shape": list(videos.shape), "dtype": str(videos.dtype)}))
"""


def _cli(*args: str, code: int = 0):
    from pipelines.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"{args}: exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    return res


def _last_json(res) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def _one_line_error(res, *needles: str) -> str:
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for n in needles:
        assert n in err, err
    return err


def test_register_promote_refuse_force_rollback_sample(tracking_env, tiny_package, model_name, tmp_path):
    name = model_name
    client = _client()
    data = make_clips_dir(tmp_path / "data", num_clips=4)

    # evaluate -> JSON + an MLflow run with eval.* metrics
    ev1 = tmp_path / "eval1.json"
    # 2 sampled videos, not the default 64 (x 10 steps x 2 for guidance: most of this test's time)
    _cli(
        "evaluate",
        "--checkpoint",
        tiny_package,
        "--data",
        data,
        "--num-clips",
        4,
        "--num-videos",
        2,
        "--out",
        ev1,
    )
    results = json.loads(ev1.read_text())
    assert results["sample"]["num_videos"] == 2
    assert results["fvd"]["status"] == "skipped"
    eval_run = client.get_run(results["mlflow_run_id"])
    assert eval_run.data.metrics["eval.val_loss"] == pytest.approx(results["val_loss"])

    # register v1 -> challenger, with lineage tags and the evaluation metrics
    v1 = _last_json(_cli("register", "--checkpoint", tiny_package, "--name", name, "--eval", ev1))
    assert v1["version"] == "1"
    mv = client.get_model_version(name, "1")
    assert mv.tags["pyoco.data_manifest_hash"] == "manifest-0"
    assert mv.tags["pyoco.noise_kind"] == "progressive" and mv.tags["pyoco.noise_alpha"] == "1.0"
    assert mv.tags["pyoco.git_revision"] == "0123abcd"
    assert mv.tags["pyoco.register_run_id"] == v1["run_id"]
    assert float(mv.tags["pyoco.metric.val_loss"]) == pytest.approx(results["val_loss"])
    assert read_state(client, name).aliases == {"challenger": "1"}

    # first promotion: no champion yet
    p1 = _last_json(_cli("promote", "--name", name))
    assert p1["promoted"] and p1["reason"] == "no champion yet"
    assert read_state(client, name).champion == "1"

    # a worse version: challenger, and promotion is refused with exit 1 and a one-line reason
    worse = tmp_path / "eval2.json"
    worse.write_text(json.dumps({"metrics": {"val_loss": results["val_loss"] + 1.0}}))
    assert (
        _last_json(_cli("register", "--checkpoint", tiny_package, "--name", name, "--eval", worse))["version"]
        == "2"
    )
    fresh = subprocess.Popen(  # runs while the promotions below go on; v2 stays challenger throughout
        [sys.executable, "-c", PREDICT_IN_FRESH_PROCESS, f"models:/{name}@challenger"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        err = _one_line_error(_cli("promote", "--name", name, code=1), "refused", "not better", "val_loss")
        assert f"{name} v2" in err
        assert read_state(client, name).champion == "1"

        forced = _last_json(_cli("promote", "--name", name, "--force"))
        assert forced["promoted"] and forced["forced"] and forced["previous_champion"] == "1"
        assert read_state(client, name).champion == "2"

        rolled = _last_json(_cli("rollback", "--name", name))
        assert rolled == {"champion_version": "1", "rolled_back": "2", "generation": 6}
        assert read_state(client, name).aliases == {"champion": "1", "challenger": "2"}

        hist = _last_json_block(_cli("registry", "history", "--name", name, "--json"))
        assert [e["action"] for e in hist["history"]] == [
            "register",
            "promote",
            "register",
            "refuse",
            "force-promote",
            "rollback",
        ]
        assert [e["generation"] for e in hist["history"]] == [1, 2, 3, 4, 5, 6]
        table = _cli("registry", "history", "--name", name).stdout
        assert "force-promote" in table and "rollback" in table

        # sample from @champion through the registry
        mp4 = tmp_path / "champion.mp4"
        _cli(
            "sample",
            "--model",
            f"models:/{name}@champion",
            "--prompt",
            "a red circle moves to the left",
            "--out",
            mp4,
            "--frames",
            3,
            "--steps",
            2,
        )
        from pyoco.video import probe

        info = probe(str(mp4))
        assert (info.num_frames, info.height, info.width) == (3, TINY_SIZE, TINY_SIZE)
    finally:
        out, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {
        "shape": [1, 3, TINY_SIZE, TINY_SIZE, 3],
        "dtype": "uint8",
    }


def _last_json_block(res) -> dict:
    return json.loads(res.stdout)


def test_bad_registry_input_is_a_one_line_error(tracking_env, model_name, tmp_path):
    client = _client()
    _one_line_error(_cli("promote", "--name", model_name, code=2), "no registered model named")
    _one_line_error(_cli("rollback", "--name", model_name, code=2), "no registered model named")
    _one_line_error(_cli("registry", "history", "--name", model_name, code=2), "no registered model named")
    _one_line_error(
        _cli(
            "sample",
            "--model",
            f"models:/{model_name}@champion",
            "--prompt",
            "x",
            "--out",
            tmp_path / "a.mp4",
            code=2,
        ),
        "no registered model named",
    )

    client.create_registered_model(model_name)
    _one_line_error(
        _cli(
            "sample",
            "--model",
            f"models:/{model_name}@champion",
            "--prompt",
            "x",
            "--out",
            tmp_path / "a.mp4",
            code=2,
        ),
        "has no alias 'champion'",
    )
    _one_line_error(_cli("promote", "--name", model_name, code=2), "no 'challenger' alias")
    _one_line_error(_cli("rollback", "--name", model_name, code=1), "has no 'champion'")
    with pytest.raises(PyocoError, match="has no version 7"):
        resolve_model_uri(f"models:/{model_name}/7")
    with pytest.raises(PyocoError, match="expected models:/NAME@ALIAS"):
        resolve_model_uri("models:/just-a-name")

    exp = client.get_experiment_by_name("pyoco") or client.get_experiment(client.create_experiment("pyoco"))
    empty_run = client.create_run(exp.experiment_id, run_name="no-model").info.run_id
    client.set_terminated(empty_run)
    _one_line_error(_cli("register", "--run", empty_run, "--name", model_name, code=2), "has no model")
    _one_line_error(_cli("register", "--run", "0" * 32, "--name", model_name, code=2), "not found")
    _one_line_error(_cli("register", "--name", model_name, code=2), "--run RUN_ID or --checkpoint")
    _one_line_error(
        _cli("register", "--checkpoint", tmp_path / "missing", "--name", model_name, code=2), "not found"
    )
    _one_line_error(
        _cli(
            "sample",
            "--model",
            f"runs:/{empty_run}/pyfunc",
            "--prompt",
            "x",
            "--out",
            tmp_path / "b.mp4",
            code=2,
        ),
        f"run {empty_run} has no model",
    )


def test_register_from_a_training_run(tracking_env, tiny_package, model_name, tmp_path):
    """`register --run`: the package comes from the run's pyoco.model_dir tag, the metrics from the eval.*
    metrics that evaluate logged into that run, and the pyfunc model is logged into the same run."""
    from pipelines import tracking
    from pipelines.evaluate.step import run_evaluate
    from pyoco.config import EvaluateConfig

    uri = tracking_env.uri
    run_id = tracking.start_run(
        uri, "pyoco-test", run_name="train", tags={tracking.TAG_MODEL_DIR: str(tiny_package)}
    )
    tracking.end_run(uri, run_id)
    data = make_clips_dir(tmp_path / "data", num_clips=3)
    cfg = EvaluateConfig(num_clips=3, timesteps=[500], sample_steps=2, num_videos=2)
    results = run_evaluate(str(tiny_package), str(data), cfg, mlflow_run_id=run_id)
    assert results["mlflow_run_id"] == run_id

    out = _last_json(_cli("register", "--run", run_id, "--name", model_name))
    assert out["run_id"] == run_id and out["metrics"]["val_loss"] == pytest.approx(results["val_loss"])
    client = _client()
    mv = client.get_model_version(model_name, out["version"])
    assert mv.run_id == run_id and mv.tags["pyoco.run_id"] == run_id
    assert {a.path for a in client.list_artifacts(run_id)} >= {"pyfunc", "evaluate"}
