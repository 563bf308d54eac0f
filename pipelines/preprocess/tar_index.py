"""Stage 1: index one WebDataset shard (tar headers, captions and labels; no video bytes), with storage
errors turned into rejects."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

from pipelines.preprocess.discover import (
    CAPTION_EXTS,
    VIDEO_EXTS,
    StepSettings,
    _apply_caption,
    _last_ext,
    _safe_key_text,
    is_unsafe_member_name,
    split_key,
)
from pipelines.preprocess.ledger import STAGE_CAPTION, STAGE_DECODE, STAGE_LABELS, STAGE_READ
from pipelines.preprocess.schemas import _reject, _row, index_schema

MAX_JSON_BYTES = 1 << 16  # a .json member larger than this is not per-sample metadata
MAX_CLS_BYTES = 1 << 10


# -------------------------------------------------------------------------------------- stage 1: index shards
def index_shard(uri: str, settings: StepSettings, options) -> list[dict]:
    """Index rows for one WebDataset shard: tar headers and captions only; video bytes stay in storage.

    Transient storage errors are retried (re-indexing the shard); a file that is not a tar, a damaged tail,
    a truncated member, an unsafe member name: each becomes a reject row, and so does a permanent storage
    error on the shard (``access_denied``, ``storage_error``...: see :func:`_storage_reject`).
    """
    from pyoco import storage

    try:
        return storage.retry_transient(lambda: _index_shard_once(uri, settings, options), what=f"index {uri}")
    except Exception as err:  # noqa: BLE001 - sorted by _storage_reject; anything else re-raised
        reason = _storage_reject(err)
        if reason is None:
            raise
        return [_reject(uri, "", STAGE_READ, reason, f"{uri}: {type(err).__name__}: {err}")]


def _storage_reject(err: BaseException) -> str | None:
    """The reject reason for a *permanent* storage error on one input (``read_error``: gone or shorter
    than listed; ``access_denied``; ``storage_error``: any other permanent OS/S3 error), or None when
    ``err`` must fail the step instead: a transient error that outlasted the retries, MemoryError, or a
    non-storage exception (a bug)."""
    from pyoco import storage

    if isinstance(err, MemoryError) or storage.is_transient(err):
        return None
    mod = type(err).__module__ or ""
    if isinstance(err, OSError | EOFError) or mod.startswith(("botocore", "aiobotocore", "s3fs", "fsspec")):
        return storage.error_reason(err)
    return None


class _StorageFailure(Exception):
    """An I/O error of the storage layer while tarfile was reading: transient, never a property of the tar."""


class _GuardedFile(io.RawIOBase):
    """Wraps a storage file so that storage errors can't be mistaken for tar damage by ``tarfile``."""

    def __init__(self, f):
        self._f = f

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, n=-1):
        try:
            return self._f.read(n)
        except Exception as err:  # noqa: BLE001
            raise _StorageFailure(err) from err

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, pos, whence=0):
        try:
            return self._f.seek(pos, whence)
        except Exception as err:  # noqa: BLE001
            raise _StorageFailure(err) from err

    def tell(self):
        return self._f.tell()


def _index_shard_once(uri: str, settings: StepSettings, options) -> list[dict]:
    from pyoco import storage

    fs, path = storage.filesystem(uri, options=options)
    try:
        size = fs.size(path)
    except FileNotFoundError as err:  # listed, then gone
        return [_reject(uri, "", STAGE_READ, "read_error", f"{err}")]
    if not size:
        return [_reject(uri, "", STAGE_READ, "not_a_tar", "0 bytes")]
    cf = settings.caption_filter()
    try:
        with fs.open(path, "rb", block_size=1 << 20, cache_type="readahead") as raw:
            f = _GuardedFile(raw)
            try:
                tar = tarfile.open(fileobj=f, mode="r:")
            except tarfile.ReadError as err:
                return [_reject(uri, "", STAGE_READ, "not_a_tar", f"{err}")]
            members: list[tarfile.TarInfo] = []
            damage = None
            try:
                while True:
                    m = tar.next()
                    if m is None:
                        break
                    members.append(m)
            except (tarfile.ReadError, EOFError) as err:
                damage = f"tar unreadable after {len(members)} members at byte {tar.offset}: {err}"
            rows = _group_members(uri, members, size, f, settings, cf)
            # A last member whose data runs past the end already records the damage (as truncated_tar).
            last_cut = bool(members) and members[-1].offset_data + members[-1].size > size
            if damage and not last_cut:
                rows.append(
                    _reject(uri, f"<damaged tail @{tar.offset}>", STAGE_READ, "truncated_tar", damage)
                )
            if not rows:
                rows.append(_reject(uri, "", STAGE_READ, "not_a_tar", "a tar with no members"))
            return rows
    except _StorageFailure as err:
        raise OSError(f"storage error while reading {uri}: {err.__cause__!r}") from err.__cause__


def _group_members(uri, members, shard_size: int, f, settings: StepSettings, cf) -> list[dict]:
    groups: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        if m.isdir():
            continue
        key, _ = split_key(m.name)
        groups.setdefault(key, []).append(m)
    rows = []
    for key, ms in groups.items():
        if any(is_unsafe_member_name(m.name) for m in ms):
            names = ", ".join(repr(m.name) for m in ms)[:300]
            rows.append(_reject(uri, _safe_key_text(key), STAGE_READ, "unsafe_path", f"member names {names}"))
            continue
        if any(not m.isfile() for m in ms):
            kinds = ", ".join(f"{m.name!r} type {m.type!r}" for m in ms if not m.isfile())
            rows.append(
                _reject(uri, key, STAGE_READ, "unsafe_path", f"link or special member: {kinds}"[:500])
            )
            continue
        truncated = [m for m in ms if m.offset_data + m.size > shard_size]
        if truncated:
            t = truncated[0]
            rows.append(
                _reject(
                    uri,
                    key,
                    STAGE_READ,
                    "truncated_tar",
                    f"{t.name} needs bytes up to {t.offset_data + t.size}, shard has {shard_size}",
                )
            )
            continue
        by_ext = {_last_ext(split_key(m.name)[1]): m for m in reversed(ms)}
        video = next((m for m in ms if _last_ext(split_key(m.name)[1]) in VIDEO_EXTS), None)
        if video is None:
            exts = sorted({split_key(m.name)[1] for m in ms})
            rows.append(_reject(uri, key, STAGE_READ, "missing_video", f"members: {exts}"))
            continue
        if video.size == 0:
            rows.append(_reject(uri, key, STAGE_DECODE, "empty_file", f"{video.name}: 0 bytes"))
            continue
        obj, labels, bad = _sample_labels(by_ext, f)
        if bad is not None:
            rows.append(_reject(uri, key, STAGE_LABELS, "bad_labels", bad))
            continue
        row = _row(uri, key, video_uri=uri, offset=video.offset_data, size=video.size, labels=labels)
        cap = next((by_ext[e] for e in CAPTION_EXTS if e in by_ext), None)
        raw: Any = None
        if cap is not None:
            if cap.size > settings.max_caption_bytes:
                row.update(
                    reason="caption_too_long",
                    stage=STAGE_CAPTION,
                    detail=f"{cap.name}: {cap.size} bytes > {settings.max_caption_bytes}",
                )
                rows.append(row)
                continue
            f.seek(cap.offset_data)
            raw = f.read(cap.size)
        elif obj is not None and obj.get("caption") is not None:
            raw = str(obj["caption"])
        rows.append(_apply_caption(row, raw, settings, cf))
    return rows


def _sample_labels(by_ext: dict, f) -> tuple[dict | None, str | None, str | None]:
    """``(json object, labels JSON text, reject detail)`` of one WebDataset sample's ``.json``/``.cls``
    members (labels None when it has neither; detail None unless a member is unusable)."""
    obj = None
    j = by_ext.get("json")
    if j is not None:
        if j.size > MAX_JSON_BYTES:
            return None, None, f"{j.name}: {j.size} bytes > {MAX_JSON_BYTES}"
        f.seek(j.offset_data)
        try:
            obj = json.loads(f.read(j.size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return None, None, f"{j.name}: not JSON ({err})"
        if not isinstance(obj, dict):
            return None, None, f"{j.name}: a JSON {type(obj).__name__}, expected an object"
    c = by_ext.get("cls")
    cls = None
    if c is not None:
        if c.size > MAX_CLS_BYTES:
            return None, None, f"{c.name}: {c.size} bytes > {MAX_CLS_BYTES}"
        f.seek(c.offset_data)
        try:
            cls = f.read(c.size).decode("utf-8").strip()
        except UnicodeDecodeError as err:
            return None, None, f"{c.name}: not UTF-8 ({err})"
        if not cls:
            return None, None, f"{c.name}: empty class"
    if obj is None and cls is None:
        return None, None, None
    labels = dict(obj or {})
    if cls is not None:
        labels["class"] = cls
    return obj, json.dumps(labels, sort_keys=True, ensure_ascii=False), None


def index_batch(batch, *, settings: StepSettings, options):
    """Ray Data UDF: a batch of shard URIs → their index rows; a shard is one unit (:mod:`.units`)."""
    import pyarrow as pa

    from pipelines.preprocess.units import input_stamp

    rows: list[dict] = []
    for uri in batch.column("shard").to_pylist():
        stamp = input_stamp(uri, options)  # before indexing: a shard rewritten meanwhile changes it
        for row in index_shard(uri, settings, options):
            rows.append({**row, "unit": uri, "stamp": stamp})
    return pa.Table.from_pylist(rows, schema=index_schema())
