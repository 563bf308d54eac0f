"""Shared fixtures: real local servers on 127.0.0.1 (moto S3, MLflow), free ports, offline defaults."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.sd_tiny import sd_pipeline, sd_pipeline_other_vae, sd_pipeline_v  # noqa: F401 (fixtures)

# Never reach the network for models: everything in tests is built from tiny configs or shipped weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault(
    "MLFLOW_TRACKING_URI", "sqlite:///" + str(Path.cwd() / ".pytest_cache" / "mlflow-default.db")
)

# Tiny models on a 2-core machine shared with Ray's processes: one torch thread avoids oversubscription
# that made small evaluations 40x slower under load. Subprocesses inherit the variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

BIN = Path(sys.executable).parent
TEST_AWS_KEY_ID = "testing-key-id"
TEST_AWS_SECRET = "pyoco-test-secret-0f9e8d7c6b5a"  # distinctive, so leak checks can grep for it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback only)
                if r.status < 500:
                    return
        except Exception as err:  # noqa: BLE001
            last = err
        time.sleep(0.25)
    raise TimeoutError(f"{url} not up after {timeout_s}s: {last}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class MotoS3:
    """A real moto_server S3 endpoint on 127.0.0.1, with the AWS env vars that s3fs/boto read."""

    def __init__(self, port: int, proc: subprocess.Popen):
        self.port = port
        self.proc = proc
        self.endpoint_url = f"http://127.0.0.1:{port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": TEST_AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> str:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_AWS_KEY_ID,
            aws_secret_access_key=TEST_AWS_SECRET,
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_s3():
    """Session-wide moto S3 server; sets the AWS_* env vars for this process (and children)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = MotoS3(port, proc)
    try:
        wait_http(server.endpoint_url + "/moto-api/", proc=proc)
        old = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        yield server
    finally:
        stop(proc)
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MlflowServer:
    def __init__(self, port: int, proc: subprocess.Popen, root: Path):
        self.port = port
        self.proc = proc
        self.root = root
        self.uri = f"http://127.0.0.1:{port}"


def start_mlflow_server(root: Path, artifacts: str | None = None) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = artifacts or (root / "artifacts").as_uri()
    log = open(root / "mlflow-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination" if artifacts.startswith("s3://") else "--default-artifact-root",
            artifacts,
            *(["--serve-artifacts"] if artifacts.startswith("s3://") else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # The job runner adds ~10 processes and ~25 s to shutdown; tests never use it.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    server = MlflowServer(port, proc, root)
    try:
        wait_http(server.uri + "/health", timeout_s=120, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifact root) on a free 127.0.0.1 port."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture(scope="session")
def ray_local():
    """An embedded single-node Ray for unit tests (2 CPUs plus the `preprocess` resource).

    Credentials never travel in task arguments: workers read them from their own environment, which an
    embedded Ray's workers inherit from this process *when Ray starts*. The session may start Ray before
    the moto fixture sets the AWS variables, so Ray starts with moto's test credentials in its
    environment, as a cluster's nodes would have theirs (the endpoint is a setting and is shipped)."""
    import ray

    if not ray.is_initialized():
        creds = {"AWS_ACCESS_KEY_ID": TEST_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET}
        before = {k: os.environ.get(k) for k in creds}
        os.environ.update(creds)
        try:
            ray.init(
                num_cpus=2,
                resources={"preprocess": 2},
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    yield ray
    ray.shutdown()


@pytest.fixture()
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def which(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(name)
    return found
