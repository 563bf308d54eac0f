"""Error classification (issue 12, item 4): which failures are the user's, which are bugs, and which
storage errors are worth retrying. Real OSErrors (a full disk, a refused connection) and a real moto S3."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time

import pytest
import typer
from botocore.exceptions import EndpointConnectionError
from typer.testing import CliRunner

from pipelines.common import PyocoError, cli_errors
from pyoco import storage
from pyoco.config import ConfigError

PYOCO = [sys.executable, "-m", "pipelines.cli"]


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @cli_errors
    def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize(
    ("exc", "code", "internal"),
    [
        (ValueError("shape mismatch (3, 4) vs (4, 3)"), 1, True),  # a bug, not the user's input
        (KeyError("frames"), 1, True),
        (ConfigError("demo.yaml: noise.alpha: must be >= 0"), 2, False),
        (PyocoError("no such run"), 2, False),
        (PyocoError("refused", exit_code=1), 1, False),
        (FileNotFoundError("data/raw: no such file or folder"), 2, False),
        # what s3fs raises for model.pretrained: s3://... when nothing listens at AWS_ENDPOINT_URL
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/sd"), 1, False),
        (TimeoutError("get timed out after 30 s"), 1, True),  # not the storage client's: stays internal
    ],
)
def test_cli_errors_separate_user_errors_from_internal_ones(exc, code, internal, monkeypatch):
    monkeypatch.delenv("PYOCO_DEBUG", raising=False)
    res = CliRunner().invoke(_app(exc), [])
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert ("internal error" in lines[0] and "PYOCO_DEBUG=1" in lines[0]) is internal
    assert lines[0].startswith("error: storage unreachable") is isinstance(exc, EndpointConnectionError)
    assert "Traceback" not in res.output


def test_cli_errors_reraise_with_debug(monkeypatch):
    monkeypatch.setenv("PYOCO_DEBUG", "1")
    res = CliRunner().invoke(_app(ValueError("bug")), [])
    assert isinstance(res.exception, ValueError)


def test_library_input_errors_still_reach_the_user_as_bad_input():
    """noise.make_prior raises InputError (a ValueError subclass) for a bad alpha: exit 2, one line."""
    res = subprocess.run(
        [*PYOCO, "noise", "stats", "--kind", "mixed", "--alpha", "-2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("error:") and "alpha" in res.stderr and "internal" not in res.stderr


def _refused_connection() -> OSError:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as err:
        return err
    raise AssertionError("connection unexpectedly accepted")


def _full_disk() -> OSError:
    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 16)
    except OSError as err:
        return err
    raise AssertionError("/dev/full accepted a write")


def test_real_oserrors_are_classified():
    full = _full_disk()
    assert full.errno == errno.ENOSPC and not storage.is_transient(full)
    refused = _refused_connection()
    assert isinstance(refused, ConnectionRefusedError) and storage.is_transient(refused)
    assert storage.is_transient(TimeoutError("read timed out"))
    assert not storage.is_transient(MemoryError())
    assert not storage.is_transient(ValueError("a bug"))
    # our own re-raise of a transient error is judged by its cause
    try:
        try:
            raise refused
        except OSError as inner:
            raise OSError("storage error while reading s3://b/x") from inner
    except OSError as wrapped:
        assert storage.is_transient(wrapped)


def test_s3_error_codes_are_classified():
    from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
            "GetObject",
        )

    for code, status in [
        ("SlowDown", 503),
        ("InternalError", 500),
        ("ServiceUnavailable", 503),
        ("Throttling", 400),
    ]:
        assert storage.is_transient(client_error(code, status)), code
    for code, status in [
        ("NoSuchKey", 404),
        ("AccessDenied", 403),
        ("NoSuchBucket", 404),
        ("InvalidRange", 416),
    ]:
        assert not storage.is_transient(client_error(code, status)), code
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not storage.is_transient(ParamValidationError(report="bad bucket name"))


def test_full_disk_fails_at_once_instead_of_retrying():
    calls = []

    def write():
        calls.append(1)
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 16)

    start = time.monotonic()
    with pytest.raises(OSError) as info:
        storage.retry_transient(write, deadline_s=10, what="write /dev/full")
    assert info.value.errno == errno.ENOSPC and len(calls) == 1
    assert time.monotonic() - start < 5


def test_permanent_s3_errors_fail_at_once_on_moto(moto_s3):
    bucket = moto_s3.make_bucket("pyoco-errors")
    storage.write_bytes(f"s3://{bucket}/ten", b"0123456789")
    cases = {
        "missing key": (lambda: storage.read_bytes(f"s3://{bucket}/nope"), FileNotFoundError),
        "missing bucket": (lambda: storage.read_bytes("s3://pyoco-no-such-bucket/x"), FileNotFoundError),
        "range past the end": (lambda: storage.read_range(f"s3://{bucket}/ten", 20, 30), OSError),
        "invalid bucket name": (lambda: storage.read_bytes("s3://Bad_Bucket!/x"), Exception),
    }
    for what, (fn, kind) in cases.items():
        start = time.monotonic()
        with pytest.raises(kind) as info:
            fn()
        elapsed = time.monotonic() - start
        assert elapsed < 10, f"{what}: retried for {elapsed:.0f}s"
        assert "still failing" not in str(info.value), what
        assert not storage.is_transient(info.value), what
    assert storage.read_range(f"s3://{bucket}/ten", 2, 5) == b"234"
