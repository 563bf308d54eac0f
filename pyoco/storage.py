"""One way to reach files: local paths and ``s3://`` URIs through fsspec/s3fs.

    fs, path = filesystem("s3://bucket/raw")          # endpoint from $AWS_ENDPOINT_URL(_S3) or the argument
    with open_uri("s3://bucket/raw/shard-000000.tar") as f: ...
    urls = glob_uris("s3://bucket/raw/*.tar")

Credentials are never passed through here by value unless the caller hands us a :class:`StorageOptions`:
boto's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles / instance roles) is
used. :class:`StorageOptions` exists so that a driver can ship its S3 settings to Ray workers whose
environment was fixed before the driver's was (its ``repr`` never shows a secret, and nothing in this
module logs one).

Retries: S3 requests retry on connection errors, timeouts and truncated bodies at three levels: botocore
("standard" mode, 2 attempts), s3fs (4 retries of dropped reads), and :func:`retry_transient` around each
whole read/write (:func:`read_range`, :func:`read_bytes`, :func:`write_bytes`): capped backoff (≤ 2 s) until
a 120 s deadline. So an endpoint that drops every connection for a few seconds costs about the outage, not
minutes of exponential backoff. Only the errors :func:`is_transient` lists are retried (connection errors,
timeouts, incomplete reads, HTTP 5xx / 429, S3 SlowDown and throttling); a full disk, a bad parameter, a
missing or forbidden object fail at once (:func:`error_reason` gives a reject reason for the per-object
ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import http.client
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec

T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "memory")
# botocore client config: connect / read timeouts (s) and its own retry policy.
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30
S3_MAX_ATTEMPTS = 2  # botocore's own backoff grows to many seconds; our loop below retries with a 2 s cap
S3FS_RETRIES = 4
# Deadline for a whole read in read_range/read_bytes, retried on transient errors.
READ_DEADLINE_S = 120.0


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """S3 settings resolved once (on the driver) and shipped to workers. ``repr`` hides the secrets."""

    endpoint_url: str | None = None
    key: str | None = dataclasses.field(default=None, repr=False)
    secret: str | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> StorageOptions:
        """Endpoint from the argument, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials
        from the standard AWS variables (None when unset, so workers fall back to their own chain)."""
        env = os.environ
        return cls(
            endpoint_url=endpoint_url
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or None,
            key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret=env.get("AWS_SECRET_ACCESS_KEY") or None,
            token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
        )

    def __repr__(self) -> str:  # explicit, so a future field can't leak by accident
        return f"StorageOptions(endpoint_url={self.endpoint_url!r}, region={self.region!r}, credentials=***)"

    __str__ = __repr__


def cache_root() -> Path:
    """Root of pyoco's local caches: ``$PYOCO_CACHE``, default ``~/.cache/pyoco`` (models under ``models/``,
    registry downloads under ``registry/``)."""
    return Path(os.environ.get("PYOCO_CACHE") or Path.home() / ".cache" / "pyoco").expanduser()


def loader_options(options: StorageOptions | None) -> dict[str, Any] | None:
    """fsspec ``storage_options`` for the diffusers-folder loaders (`pyoco.model`, `pyoco.pretrained`,
    `pyoco.text`): the endpoint only, so they may travel in Ray task/actor args. Credentials stay with each
    process's own AWS chain."""
    return {"endpoint_url": options.endpoint_url} if options and options.endpoint_url else None


def scheme(uri: str) -> str:
    uri = str(uri)
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def is_remote(uri: str) -> bool:
    """True for object-store / network URIs (s3://, gs://, http://, ...); False for local paths and file://."""
    return scheme(uri) in REMOTE_SCHEMES


def _s3_kwargs(endpoint_url: str | None, options: StorageOptions | None) -> dict[str, Any]:
    opts = options or StorageOptions.from_env(endpoint_url)
    endpoint = endpoint_url or opts.endpoint_url
    kwargs: dict[str, Any] = {
        "config_kwargs": {
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
            "retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        },
    }
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if opts.region:
        kwargs["client_kwargs"] = {"region_name": opts.region}
    if opts.key and opts.secret:
        kwargs["key"] = opts.key
        kwargs["secret"] = opts.secret
        if opts.token:
            kwargs["token"] = opts.token
    return kwargs


def filesystem(
    uri: str, *, endpoint_url: str | None = None, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a local path or URI. ``path`` is what ``fs`` methods take (no scheme for s3)."""
    uri = str(uri)
    sch = scheme(uri)
    if sch in ("s3", "s3a"):
        fs = fsspec.filesystem("s3", **_s3_kwargs(endpoint_url, options))
        fs.retries = S3FS_RETRIES
        return fs, uri.split("://", 1)[1].rstrip("/")
    if sch in ("", "file"):
        fs = fsspec.filesystem("file")
        path = uri.split("://", 1)[1] if sch == "file" else uri
        return fs, os.path.abspath(os.path.expanduser(path))
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of :func:`filesystem`: a full URI for ``path`` on ``fs``."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{'s3' if proto in ('s3', 's3a') else proto}://{path.lstrip('/')}"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/`` (no normalisation of ``..``)."""
    out = str(uri)
    for p in parts:
        p = str(p).strip("/")
        if not p:
            continue
        out = out.rstrip("/") + "/" + p if out else p
    return out


def open_uri(uri: str, mode: str = "rb", *, endpoint_url: str | None = None, options=None, **kwargs):
    """Open a local path or URI; creates parent folders when writing locally."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url, options=options)
    if "w" in mode or "a" in mode:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode, **kwargs)


def exists(uri: str, *, endpoint_url: str | None = None, options=None) -> bool:
    fs, path = filesystem(uri, endpoint_url=endpoint_url, options=options)
    return fs.exists(path)


def list_files(uri: str, *, suffixes: tuple[str, ...] | None = None, recursive: bool = True, **fs_kwargs):
    """Sorted full URIs of the files under ``uri`` (optionally only those ending in ``suffixes``)."""
    fs, path = filesystem(uri, **fs_kwargs)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if fs.isfile(path):
        found = [path]
    elif recursive:
        found = fs.find(path)
    else:
        found = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
    if suffixes:
        found = [p for p in found if p.lower().endswith(tuple(s.lower() for s in suffixes))]
    return sorted(to_uri(fs, p) for p in found)


def has_glob(uri: str) -> bool:
    return any(c in str(uri) for c in "*?[")


def glob_uris(pattern: str, **fs_kwargs) -> list[str]:
    """Sorted full URIs matching a glob such as ``s3://b/raw/shard-*.tar`` or ``data/**/*.mp4``."""
    fs, path = filesystem(pattern, **fs_kwargs)
    return sorted(to_uri(fs, p) for p in fs.glob(path) if fs.isfile(p))


def match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def retry_transient(
    fn: Callable[[], T], *, deadline_s: float = READ_DEADLINE_S, what: str = "storage call"
) -> T:
    """Call ``fn`` until it succeeds, retrying transient I/O errors (:func:`is_transient`) with capped
    backoff until a deadline. Any other error (a full disk, a missing or forbidden object, a bad
    parameter, a bug) is raised at once, unchanged."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - s3fs/aiohttp/botocore raise many types; sorted below
            if not is_transient(err):
                raise
            attempt += 1
            elapsed = time.monotonic() - start
            if elapsed >= deadline_s:
                raise OSError(f"{what}: still failing after {elapsed:.0f}s ({type(err).__name__})") from err
            time.sleep(min(0.2 * 2 ** min(attempt, 4), 2.0) * (0.5 + random.random() / 2))


# The transient errors, explicitly: everything else is permanent and fails (or is rejected) at once.
# errno values of network trouble, plus the two s3fs maps throttling / 5xx to (EBUSY: SlowDown and
# ServiceUnavailable, EREMOTEIO: InternalError / 500).
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in "ECONNRESET ECONNREFUSED ECONNABORTED ETIMEDOUT EPIPE ENETDOWN ENETUNREACH ENETRESET EHOSTDOWN "
    "EHOSTUNREACH EAGAIN EBUSY EREMOTEIO".split()
    if hasattr(errno, name)
)
# S3 error codes that mean "try again" (throttling, server trouble); any other code is permanent
# (NoSuchKey, NoSuchBucket, AccessDenied, InvalidRange, InvalidArgument, ...).
TRANSIENT_S3_CODES = frozenset(
    "SlowDown Throttling ThrottlingException RequestThrottled TooManyRequests RequestLimitExceeded "
    "RequestTimeout RequestTimeoutException InternalError ServiceUnavailable 503 500".split()
)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception classes that are transient whatever their message (imported lazily: optional deps)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    try:
        import botocore.exceptions as bexc

        # HTTPClientError covers ReadTimeoutError, ConnectionClosedError, ResponseStreamingError;
        # ConnectionError covers EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError.
        types += [bexc.HTTPClientError, bexc.ConnectionError, bexc.IncompleteReadError]
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3.exceptions as uexc

        types += [uexc.ProtocolError, uexc.TimeoutError, uexc.NewConnectionError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_PERMANENT_TYPES = (
    MemoryError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _verdict(err: BaseException) -> bool | None:
    """True: transient; False: permanent; None: this link says nothing (look at its cause)."""
    if isinstance(err, (ShortReadError, *_PERMANENT_TYPES)):
        return False
    response = getattr(err, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or status == 429 or code in TRANSIENT_S3_CODES
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int) and type(err).__module__.startswith("aiohttp"):
        return status >= 500 or status == 429
    if isinstance(err, _transient_types()):
        return True
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in TRANSIENT_ERRNOS:
            return True
        if err.errno == errno.EIO:  # s3fs's wrapper for an unmapped S3 code: its cause decides
            return None
        return False  # ENOSPC, EDQUOT, EROFS, EINVAL, EACCES, ENAMETOOLONG, ...
    return None


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` can help: connection errors, timeouts, truncated bodies, HTTP 5xx / 429
    and S3 throttling. Wrappers (s3fs's ``OSError(EIO)``, our own re-raises) are judged by their cause;
    anything not known to be transient is permanent."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
        link = link.__cause__ or link.__context__
    return False


def error_reason(err: BaseException) -> str:
    """A stable reject reason for a permanent per-object storage error."""
    if isinstance(err, FileNotFoundError | ShortReadError):
        return "read_error"  # gone or shorter than when it was listed
    if isinstance(err, PermissionError):
        return "access_denied"
    return "storage_error"


class ShortReadError(EOFError):
    """A range read that returned fewer bytes than asked for, three times: the object is shorter."""


def read_bytes(uri: str, *, endpoint_url: str | None = None, options=None) -> bytes:
    """The whole object, retried on transient errors."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url, options=options)
    return retry_transient(lambda: fs.cat_file(path), what=f"read {uri}")


def read_range(uri: str, start: int, end: int, *, endpoint_url: str | None = None, options=None) -> bytes:
    """Bytes ``[start, end)`` of an object, retried on transient errors; short reads are errors."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url, options=options)

    def _read() -> bytes:
        for _ in range(3):  # a body cut short by the network: fetch again; past the end of the object: error
            data = fs.cat_file(path, start=start, end=end)
            if len(data) == end - start:
                return data
        raise ShortReadError(f"{uri}: bytes [{start}, {end}) requested, {len(data)} available")

    return retry_transient(_read, what=f"read {uri}[{start}:{end}]")


def write_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None, options=None) -> None:
    """Write a whole object atomically, retried on transient errors: readers see the old content or the
    new, never a part. Locally: a temporary file in the same folder, fsynced, then renamed over the target.
    Remote: one ``pipe_file`` of the complete bytes, which s3fs sends as a single PUT below 100 MB (and as a
    multipart upload that only appears when completed above that), never a streamed file handle whose
    ``close`` would publish whatever had been written so far."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url, options=options)
    data = bytes(data)
    if is_remote(uri):
        retry_transient(lambda: fs.pipe_file(path, data), what=f"write {uri}")
        return
    import tempfile

    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(uri: str, *, recursive: bool = True, endpoint_url: str | None = None, options=None) -> None:
    fs, path = filesystem(uri, endpoint_url=endpoint_url, options=options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
