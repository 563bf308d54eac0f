"""`pyoco submit`: token lookup, packaging, credentials by reference, and real jobs on a local token-auth
2-node Ray cluster (infra/local) whose metadata, runtime_env, entrypoint and logs must not hold a secret;
local config paths are refused there (issue 15)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipelines.common import PyocoError
from pipelines.workflow.package import build_package
from pipelines.workflow.submit import (
    AuthToken,
    alive_nodes,
    check_local_paths,
    check_no_secrets,
    exit_code_for,
    job_env_vars,
    read_auth_token,
    secret_values,
)
from pyoco.config import parse_config
from tests.fixtures_infra import REPO, SCRUBBED, TEST_AWS_KEY_ID, TEST_AWS_SECRET, running_stack, token_of

CONFIG = "name: submit-test\noutput: s3://pyoco-submit/out\n"


# ------------------------------------------------------------------------------------------------ token
def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home-file\n")
    token_file = tmp_path / "tok"
    token_file.write_text("from-path-file")

    assert read_auth_token({"HOME": str(home)}).value == "from-home-file"
    t = read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert (t.value, t.source) == ("from-path-file", f"RAY_AUTH_TOKEN_PATH ({token_file})")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_AUTH_TOKEN": "from-env"}
    assert read_auth_token(env).value == "from-env"
    assert "from-env" not in repr(read_auth_token(env))

    with pytest.raises(PyocoError, match="no Ray auth token"):
        read_auth_token({"HOME": str(tmp_path / "nobody")})
    with pytest.raises(PyocoError, match="cannot read"):
        read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PyocoError, match="empty"):
        read_auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_missing_token_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "submit",
            "--config",
            str(config),
            "--address",
            "http://127.0.0.1:9",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Ray auth token"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ------------------------------------------------------------------------------------------ environment
def test_env_vars_pass_settings_by_value_and_credentials_by_reference():
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": TEST_AWS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET,
        "MLFLOW_TRACKING_PASSWORD": "hunter2-hunter2",
        "AWS_PROFILE": "laptop-profile",
        "UNRELATED": "x",
    }
    env_vars, refs = job_env_vars(env)
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert env_vars["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == "${AWS_SECRET_ACCESS_KEY}"
    assert env_vars["AWS_ACCESS_KEY_ID"] == "${AWS_ACCESS_KEY_ID}"
    assert env_vars["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_TRACKING_PASSWORD}"
    assert not {"UNRELATED", "AWS_SESSION_TOKEN", "AWS_PROFILE"} & set(env_vars)
    assert refs == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"]
    assert TEST_AWS_SECRET not in json.dumps(env_vars) and "hunter2" not in json.dumps(env_vars)

    with pytest.raises(PyocoError, match="embeds a password"):
        job_env_vars({"MLFLOW_TRACKING_URI": "https://alice:pw@mlflow.example.com"})


def test_secret_guard_refuses_payload_or_file_with_a_secret(tmp_path):
    token = AuthToken("f" * 64, "test")
    secrets_ = secret_values(
        token, {"AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE00"}
    )
    assert set(secrets_) == {"AWS_SECRET_ACCESS_KEY", "the Ray auth token"}
    check_no_secrets({"env_vars": {"AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}"}}, None, secrets_)
    with pytest.raises(PyocoError, match="AWS_SECRET_ACCESS_KEY would appear"):
        check_no_secrets({"entrypoint": f"echo {TEST_AWS_SECRET}"}, None, secrets_)

    config = tmp_path / "leaky.yaml"
    config.write_text(CONFIG + f"# {'f' * 64}\n")
    package = build_package(config, tmp_path)
    with pytest.raises(PyocoError, match="_pyoco_submit/leaky.yaml contains the value of the Ray auth token"):
        check_no_secrets({}, package, secrets_)


# --------------------------------------------------------------------------------------------- package
def test_package_is_the_project_without_local_state_and_deterministic(tmp_path):
    config = tmp_path / "outside.yaml"
    config.write_text(CONFIG)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = build_package(config, tmp_path / "a")
    second = build_package(config, tmp_path / "b")
    assert first.path.read_bytes() == second.path.read_bytes(), "same content must give the same zip"
    names = zipfile.ZipFile(first.path).namelist()
    assert first.config_in_job == "_pyoco_submit/outside.yaml" and first.config_in_job in names
    assert (
        "pipelines/workflow/submit.py" in names and "pyoco/config.py" in names and "pyproject.toml" in names
    )
    forbidden = (
        ".venv/",
        ".git/",
        "__pycache__/",
        ".pyoco-local/",
        ".pytest_cache/",
        "demo/",
        "mlruns/",
        "tests/",
    )
    assert not [n for n in names if any(n.startswith(f) or f"/{f}" in n for f in forbidden)]
    assert not [n for n in names if n.endswith((".pyc", "auth_token", ".pem"))]
    assert first.size_bytes < 20 * 2**20

    inside = build_package(REPO / "pipelines" / "configs" / "cluster.yaml", tmp_path)
    assert inside.config_in_job == "pipelines/configs/cluster.yaml"
    assert not [n for n in zipfile.ZipFile(inside.path).namelist() if n.startswith("_pyoco_submit/")]


def test_exit_code_follows_the_job_status():
    from types import SimpleNamespace

    from ray.job_submission import JobStatus

    assert exit_code_for(SimpleNamespace(status=JobStatus.SUCCEEDED, driver_exit_code=0)) == 0
    assert exit_code_for(SimpleNamespace(status=JobStatus.FAILED, driver_exit_code=3)) == 3
    assert exit_code_for(SimpleNamespace(status=JobStatus.FAILED, driver_exit_code=None)) == 1
    assert exit_code_for(SimpleNamespace(status=JobStatus.STOPPED, driver_exit_code=None)) == 1


# ---------------------------------------------------------------------------------------- local paths
# demo.yaml's shape: every path relative, plus an absolute local model folder and a file:// VAE.
LOCAL_CONFIG = """name: local-paths
output: ./demo/out
synth: {out: ./demo/out/raw}
preprocess: {input: ./demo/out/raw, output: ./demo/out/data}
model: {pretrained: /srv/models/sd, vae: "file:///srv/models/sd/vae"}
"""
LOCAL_FIELDS = {
    "output": "./demo/out",
    "synth.out": "./demo/out/raw",
    "preprocess.input": "./demo/out/raw",
    "preprocess.output": "./demo/out/data",
    "model.pretrained": "/srv/models/sd",
    "model.vae": "file:///srv/models/sd/vae",
}


def test_local_paths_refused_on_several_nodes_warned_on_one():
    import yaml

    cfg = parse_config(yaml.safe_load(LOCAL_CONFIG))
    with pytest.raises(PyocoError) as refused:
        check_local_paths(cfg, nodes=2)
    message = str(refused.value)
    assert message.startswith("refusing to submit: the cluster has 2 nodes") and "\n" not in message
    for name, value in LOCAL_FIELDS.items():
        assert f"{name}={value!r}" in message, name
    assert "--allow-local-paths" in message

    # Overridden, or on a single node: the relative ones only warn (they land in the job's working dir).
    relative = ["output", "synth.out", "preprocess.input", "preprocess.output"]
    for kwargs in ({"nodes": 2, "allow": True}, {"nodes": 1}):
        warnings = check_local_paths(cfg, **kwargs)
        assert [w.split("=")[0] for w in warnings] == relative, (kwargs, warnings)
    # Node count unknown: warn, and say that several nodes would not share them.
    unknown = check_local_paths(cfg, nodes=None)
    assert len(unknown) == 5 and "could not read the cluster's node count" in unknown[-1]

    # All on S3 (the cluster demo): nothing to say on any cluster; "minilm" is an encoder name, not a path.
    demo = parse_config(yaml.safe_load((REPO / "pipelines/configs/cluster_demo.yaml").read_text()))
    assert check_local_paths(demo, nodes=2) == []
    one_local = parse_config({"output": "s3://b/out", "train": {"storage_path": "/tmp/ray"}})
    with pytest.raises(PyocoError, match=r"has 3 nodes .*: train.storage_path='/tmp/ray'; use s3://"):
        check_local_paths(one_local, nodes=3)


# ------------------------------------------------------------------------------------- on a real cluster
@pytest.fixture(scope="module")
def head_stack(tmp_path_factory):
    """A token-auth Ray head + 1 worker node and moto on 127.0.0.1, started with the fake AWS secret in
    their environment."""
    state_dir = tmp_path_factory.mktemp("submit-stack")
    with running_stack(
        state_dir,
        workers=1,
        head_cpus=1,
        worker_cpus=1,
        object_store_mb=100,
        mlflow=False,
        buckets=["pyoco-submit"],
    ) as state:
        yield state


def _submit(state, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(
        RAY_AUTH_TOKEN_PATH=state["ray"]["token_path"],
        AWS_ACCESS_KEY_ID=TEST_AWS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_AWS_SECRET,
        AWS_ENDPOINT_URL=state["s3"]["url"],
        AWS_ENDPOINT_URL_S3=state["s3"]["url"],
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_TRACKING_URI="http://127.0.0.1:9/mlflow-not-contacted",
        HOME=str(config.parent),  # no ~/.ray/auth_token to fall back on
    )
    argv = [sys.executable, "-m", "pipelines.cli", "submit", "--config", str(config)]
    argv += ["--address", state["ray"]["dashboard_url"], *extra]
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


# Runs as the job's entrypoint on the cluster: uses the credentials the node resolves from the references
# (an S3 write to moto), reads the shipped config, and prints only a hash of the secret.
PROBE = r"""
import hashlib, os, sys, boto3
secret = os.environ["AWS_SECRET_ACCESS_KEY"]
print("secret-sha256", hashlib.sha256(secret.encode()).hexdigest())
print("mlflow", os.environ["MLFLOW_TRACKING_URI"])
body = open(sys.argv[1], "rb").read()
boto3.client("s3").put_object(Bucket="pyoco-submit", Key="probe/config.yaml", Body=body)
print("probe-ok")
"""


@pytest.mark.slow
def test_submit_wait_succeeds_and_no_secret_reaches_the_job_record(head_stack, tmp_path):
    import boto3
    from ray.job_submission import JobSubmissionClient

    config = tmp_path / "job.yaml"
    config.write_text(CONFIG)
    probe = f"python -c {shlex.quote(PROBE)} {{config}}"
    proc = _submit(head_stack, config, "--wait", "--entrypoint", probe)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-2000:])
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("pyoco-submit-test-")

    # The job ran with the node's credentials (the S3 write worked) and the shipped config.
    assert "secret-sha256 " + hashlib.sha256(TEST_AWS_SECRET.encode()).hexdigest() in proc.stdout
    assert "mlflow http://127.0.0.1:9/mlflow-not-contacted" in proc.stdout and "probe-ok" in proc.stdout
    s3 = boto3.client(
        "s3",
        endpoint_url=head_stack["s3"]["url"],
        aws_access_key_id=TEST_AWS_KEY_ID,
        aws_secret_access_key=TEST_AWS_SECRET,
        region_name="us-east-1",
    )
    assert s3.get_object(Bucket="pyoco-submit", Key="probe/config.yaml")["Body"].read() == CONFIG.encode()

    # What anyone with Jobs API access sees: references only, no secret, no token.
    token = token_of(head_stack)
    client = JobSubmissionClient(
        head_stack["ray"]["dashboard_url"], headers={"Authorization": f"Bearer {token}"}
    )
    info = client.get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED"
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == "${AWS_SECRET_ACCESS_KEY}"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9/mlflow-not-contacted"
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert info.metadata["pyoco.credentials"] == "by-reference:AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY"
    assert info.metadata["pyoco.config"] == "_pyoco_submit/job.yaml"
    record = json.dumps(
        {"info": vars(info), "logs": client.get_job_logs(job_id)},
        default=str,
    )
    cli_output = proc.stdout + proc.stderr
    for secret in (TEST_AWS_SECRET, token):
        assert secret not in record
        assert secret not in cli_output


def test_wrong_token_is_refused(head_stack, tmp_path, monkeypatch):
    from pipelines.workflow.submit import submit_workflow

    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    for key in SCRUBBED:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(wrong))
    with pytest.raises(
        PyocoError, match=r"rejected the Ray auth token from RAY_AUTH_TOKEN_PATH .*not this cluster's"
    ):
        submit_workflow(config, head_stack["ray"]["dashboard_url"])


@pytest.mark.slow
def test_local_paths_are_refused_by_a_two_node_cluster(head_stack, tmp_path):
    from ray.job_submission import JobSubmissionClient

    token = token_of(head_stack)
    url = head_stack["ray"]["dashboard_url"]
    assert alive_nodes(url, AuthToken(token, "test")) == 2
    assert alive_nodes(url, AuthToken("0" * 64, "test")) is None  # refused (403): unknown, not 0
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    jobs_before = {j.submission_id for j in client.list_jobs()}

    config = tmp_path / "local.yaml"
    config.write_text(LOCAL_CONFIG)
    proc = _submit(head_stack, config, "--wait")
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to submit: the cluster has 2 nodes")
    assert all(name in lines[0] for name in LOCAL_FIELDS) and proc.stdout == ""
    assert {j.submission_id for j in client.list_jobs()} == jobs_before, "a refused submit created a job"

    # --allow-local-paths: submitted (warnings only); the job runs. Its entrypoint exits 3, and
    # `submit --wait` exits with the failed job's code (one job for both checks: each costs ~10 s here).
    entrypoint = 'python -c "import sys; sys.exit(3)"'
    proc = _submit(head_stack, config, "--allow-local-paths", "--wait", "--entrypoint", entrypoint)
    assert proc.returncode == 3, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "FAILED" in proc.stderr.splitlines()[-1]
    assert "warning: output='./demo/out' is a relative local path" in proc.stderr
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("pyoco-local-paths-") and job_id not in jobs_before
    assert str(client.get_job_info(job_id).status.value) == "FAILED"
