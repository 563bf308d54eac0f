"""Credentials inside URIs (issue 12, item 7): refused in config with a one-line error that names the field
and never echoes the value, and masked everywhere we log or serialise a config when they get past the
config (a tracking URI from the environment, a config built in code), against a real `mlflow server`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipelines import tracking
from pipelines.common import PyocoError
from pipelines.workflow.submit import job_env_vars
from pyoco.config import ConfigError, load_config

pytest_plugins = ("tests.fixtures_registry",)

PASSWORD = "pw-Zq81-uri-secret"
S3_SECRET = "s3sekret-Yx7-uri-secret"
TOKEN = "tok-Hh3-uri-secret"
SIGNATURE = "sig-Qq5-uri-secret"


@pytest.mark.parametrize(
    ("field", "yaml_text"),
    [
        ("mlflow.tracking_uri", f"mlflow:\n  tracking_uri: https://alice:{PASSWORD}@mlflow.example\n"),
        ("train.storage_path", f"train:\n  storage_path: s3://AKIAEXAMPLE:{S3_SECRET}@bucket/ckpt\n"),
        ("model.pretrained", f"model:\n  pretrained: https://{TOKEN}@models.example/sd\n"),
    ],
)
def test_config_refuses_a_uri_with_credentials_naming_the_field(tmp_path, field, yaml_text):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert f"{cfg}: {field}: URI embeds credentials" in msg
    assert "MLFLOW_TRACKING_USERNAME" in msg and "AWS_SECRET_ACCESS_KEY" in msg  # the hint: use the env
    for secret in (PASSWORD, S3_SECRET, TOKEN):
        assert secret not in msg


def test_submit_refuses_such_a_config_before_building_a_package(tmp_path):
    """The config file is shipped in the job package as is, so `pyoco submit` must refuse it up front."""
    from pipelines.cli import app

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"name: leak\nmlflow:\n  tracking_uri: https://alice:{PASSWORD}@mlflow.example\n")
    res = CliRunner().invoke(app, ["submit", "--config", str(cfg), "--address", "http://127.0.0.1:9"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "mlflow.tracking_uri: URI embeds credentials" in err
    assert PASSWORD not in res.output


def test_submit_refuses_a_forwarded_uri_with_a_token_as_user_name():
    with pytest.raises(PyocoError, match=r"MLFLOW_TRACKING_URI embeds credentials \(user@host\)"):
        job_env_vars({"MLFLOW_TRACKING_URI": f"https://{TOKEN}@mlflow.example"})
    with pytest.raises(PyocoError, match="AWS_ENDPOINT_URL embeds a password"):
        job_env_vars({"AWS_ENDPOINT_URL": f"https://key:{S3_SECRET}@minio.example"})


def test_redact_uri_masks_userinfo_and_credential_query_values():
    text = (
        f"uri https://alice:{PASSWORD}@h/x and s3://AKIA:{S3_SECRET}@b/k, "
        f"https://h/o?X-Amz-Credential=AKIA%2F1&X-Amz-Signature={SIGNATURE}&part=2"
    )
    out = tracking.redact_uri(text)
    assert out == (
        "uri https://***@h/x and s3://***@b/k, https://h/o?X-Amz-Credential=***&X-Amz-Signature=***&part=2"
    )
    assert tracking.redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"


def test_uri_credentials_that_bypass_config_validation_never_reach_mlflow(
    tracking_env, monkeypatch, model_name
):
    """The tracking URI comes from the environment with userinfo (the server ignores it), and the config
    is changed in code after validation: params, tags, the resolved-config artifact and text artifacts
    must hold none of the credentials, while still showing where things are."""
    host = tracking_env.uri.split("://", 1)[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@{host}")
    uri = tracking.resolve_tracking_uri(None)
    assert PASSWORD in uri  # the URI really carries the credentials here

    cfg = load_config(None)
    cfg.mlflow.tracking_uri = uri  # assignment after parse: past the config's URI check
    cfg.train.storage_path = f"s3://AKIAEXAMPLE:{S3_SECRET}@bucket/ckpt"
    cfg.evaluate.evaluator = f"https://h/o/evaluator.pt?X-Amz-Signature={SIGNATURE}"
    run_id = tracking.start_run(
        uri,
        model_name,
        run_name="leak-check",
        config=cfg,
        tags={"pyoco.source": f"https://{TOKEN}@m.example/x"},
    )
    tracking.log_text(uri, run_id, json.dumps({"checkpoint": cfg.train.storage_path}), "outputs.json")
    tracking.set_tags(uri, run_id, {"pyoco.checkpoint": cfg.train.storage_path})
    tracking.end_run(uri, run_id)

    run = tracking.client(tracking_env.uri).get_run(run_id)
    texts = tracking.artifact_texts(tracking_env.uri, run_id)
    assert "config/resolved.yaml" in texts and "outputs.json" in texts
    blob = json.dumps([run.data.params, run.data.tags, texts])
    for secret in (PASSWORD, S3_SECRET, TOKEN, SIGNATURE):
        assert secret not in blob, secret
    assert run.data.params["train.storage_path"] == "s3://***@bucket/ckpt"
    assert run.data.params["mlflow.tracking_uri"] == f"http://***@{host}"
    assert run.data.tags["pyoco.source"] == "https://***@m.example/x"
    assert "s3://***@bucket/ckpt" in texts["config/resolved.yaml"]
