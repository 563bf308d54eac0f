"""Helpers for the infra/submit tests: ``infra/local/services.py`` (loaded from its file) and a small
token-auth local stack. Everything listens on 127.0.0.1; every process started here is stopped here."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES_PY = REPO / "infra" / "local" / "services.py"
# Same distinctive values as tests/conftest.py, so leak checks can grep for them.
TEST_AWS_KEY_ID = "testing-key-id"
TEST_AWS_SECRET = "pyoco-test-secret-0f9e8d7c6b5a"
# The parent environment may point at other servers or hold another token: never let that reach a stack.
# AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL in botocore: a value left by the session moto fixture would
# send jobs to the wrong S3 endpoint.
SCRUBBED = (
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL_S3",
)


def load_services():
    """infra/local/services.py as a module (infra/ is not a package)."""
    name = "pyoco_infra_local_services"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SERVICES_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stack_env(**extra: str) -> dict[str, str]:
    """The environment a stack is started with: the test AWS pair (a fake, distinctive secret)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(
        AWS_ACCESS_KEY_ID=TEST_AWS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_AWS_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def running_stack(state_dir: Path, **spec_fields):
    """Start a stack with ``StackSpec(**spec_fields)`` under the test environment; always stop it."""
    services = load_services()
    with pytest.MonkeyPatch.context() as mp:
        for key in SCRUBBED:
            mp.delenv(key, raising=False)
        for key, value in stack_env().items():
            mp.setenv(key, value)
        try:
            state = services.start(services.StackSpec(**spec_fields), state_dir)
        except services.StackError as err:
            # Ray gives a node 30 s (hard-coded) to register with the GCS; on a machine loaded by other
            # tests that can run out. start() has stopped everything again: one more try.
            if "timed out during startup" not in str(err):
                raise
            print(f"local stack: retrying once after: {' '.join(str(err).split())[:300]}")
            state = services.start(services.StackSpec(**spec_fields), state_dir)
    try:
        yield state
    finally:
        services.stop(state_dir)


def token_of(state: dict) -> str:
    return Path(state["ray"]["token_path"]).read_text().strip()


def listening_addresses(pids: set[int]) -> set[str]:
    """The IP addresses that these processes listen on (IPv4-mapped IPv6 addresses as IPv4)."""
    import psutil

    addrs = set()
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    ip = ipaddress.ip_address(conn.laddr.ip)
                    addrs.add(str(getattr(ip, "ipv4_mapped", None) or ip))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return addrs


def stack_pids(services, state: dict) -> set[int]:
    """Every process of a running stack (each service's process group)."""
    return {p.pid for rec in services._all_records(state) for p in services._group_members(rec)}
