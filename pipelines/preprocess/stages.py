"""``pyoco preprocess``: raw videos (WebDataset shards, a captioned folder, or UCF-101 class folders, local or
s3://) → training clips in parquet, with a ledger of every rejected input and a manifest.

Pipeline (Ray Data, streaming; every stage runs in Ray tasks/actors, never on the driver)::

    index (1 task per shard: tar headers + captions, no video bytes) → caption rules (pyoco.captions)
      → materialise the small index → duplicate captions resolved on the driver (first (source, key) wins)
      → decode + clip + resize/crop (tasks, pyoco.video; reads each video's bytes by range)
      → caption embedding (MiniLM, actor pool) → write parquet (tasks, ≤ rows_per_file rows per file)
      → a small per-row summary streams back to the driver, which writes rejects/ and manifest.json.

Placement: every task and actor requests ``cfg.resource`` (default ``preprocess``, a tiny fraction of one
unit, so it acts as a node label) when some node offers it, else plain CPU scheduling. Decode tasks take
``num_cpus_per_task`` CPUs, index and write tasks at most a quarter CPU, embedding actors
``embed_num_cpus`` (default 0: MiniLM on short captions costs a few % of decoding, and a whole CPU per actor
would starve decode on small nodes).

Memory: Ray Data's streaming executor backpressures between stages, so the data in flight is bounded
by the object store, whatever the dataset size. What grows with the dataset is the index (a few hundred
bytes per video, in the object store, spillable), the driver's duplicate table (one 32-char hash per
distinct caption) and the reject ledger. Frames are stored as ``large_binary`` (64-bit offsets), so big
rows never hit Arrow's 2 GiB ``binary`` offset limit, and a file holds at most ``rows_per_file`` rows and
about 256 MiB.

Output (ARCHITECTURE.md)::

    OUT/clips/train/part-<hash>.parquet  one row per clip of a training video (schema: pyoco.clips)
    OUT/clips/val/part-<hash>.parquet    one row per clip of a held-out video
    OUT/rejects/part-00000.parquet       one row per rejected input: source, key, stage, reason, detail
    OUT/manifest.json                    counts (per split too), rejects by reason, config, data and
                                         eval-data hashes, pyoco version, decode nodes

A run writes ``clips/`` and ``rejects/`` under ``OUT/.staging/`` and swaps them in for the previous run's
only once it has succeeded (accounting holds, reject fraction within ``max_reject_fraction``), writing
``manifest.json`` last (:func:`_publish`). A failed run leaves ``OUT/`` as it was and its own outputs, with
``manifest.incomplete.json``, in ``OUT/.staging/``.

The clip columns, and how a video is assigned to train or val (``preprocess.val_fraction``, a threshold on
a hash of the video's key: stable when videos are added), are documented in :mod:`pyoco.clips`. We store
the token-level ``(L, D)`` caption states and the mask rather than a pooled ``(D,)`` vector because that is
exactly the cross-attention input training needs (so training never runs the text encoder).

Labels (the ``labels`` column, JSON object text): a WebDataset sample's ``.json`` member (the object as-is,
e.g. the synth ground truth), ``{"class": TEXT}`` from a ``.cls`` member (merged into the ``.json`` object
when a sample has both), ``{"class": NAME}`` for a UCF-101 class folder; null otherwise.

Reject reasons (``rejects/`` ``stage`` / ``reason``):

- ``read``: ``not_a_tar`` (a shard tarfile can't open, or an empty one), ``truncated_tar`` (a member cut off
  by the end of the shard, or an unreadable tail), ``unsafe_path`` (``../``, absolute, link or device
  members: never extracted, never used as a path), ``missing_video`` (a key with no video member, or a
  captions-file line naming a missing file), ``duplicate_entry`` (a file listed twice), ``read_error``
  (a file that disappeared between listing and reading);
- ``labels``: ``bad_labels`` (a ``.json`` member that is not a JSON object or is over 64 KiB, a ``.cls``
  member that is empty or over 1 KiB: a sample whose labels would be silently lost);
- ``caption``: the ``caption_*`` codes of :mod:`pyoco.captions`; ``dedupe``: ``duplicate_caption``;
- ``read`` (storage): ``access_denied`` and ``storage_error``, a *permanent* storage error on one object
  (forbidden, invalid range, ...), recorded at once, never retried;
- ``decode``: :data:`pyoco.video.DECODE_REASONS` (``empty_file``, ``decode_error``, ``no_video_stream``,
  ``too_short``), and ``decode_crash``: the video killed its decode worker process (segfault, OOM kill)
  when decoded alone (:func:`decode_batch`).

A transient storage error that outlasts the retries (see :mod:`pyoco.storage`) fails the job with an
error, and so does ``MemoryError``; neither is ever recorded as a property of the data. More than
``max_reject_fraction`` (default 0.5) of the inputs rejected fails the step, naming the top reasons.

Accounting: every input (a sample of a shard, a video of a folder, a damaged shard or tail of a shard)
is exactly one row of the index. The step fails, without writing a manifest, unless
``inputs == accepted_videos + sum(rejected.values())``.

Config: ``--config`` takes the workflow YAML (its ``preprocess:`` section is used) or a YAML file whose
top level is just the preprocess fields (``input:``, ``output:``, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pyoco import clips as clipfmt
from pyoco.config import ConfigError, PreprocessConfig, PyocoConfig, config_hash, parse_config, read_yaml

VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "gif", "mpg", "mpeg", "ogv", "wmv", "flv", "ts")
CAPTION_EXTS = ("txt", "caption", "cap", "text")
CAPTION_FILES = ("captions.csv", "captions.jsonl")
MAX_JSON_BYTES = 1 << 16  # a .json member larger than this is not per-sample metadata
MAX_CLS_BYTES = 1 << 10
MAX_FILE_BYTES = 256 * 2**20  # target upper bound of one clips parquet file
RESOURCE_FRACTION = 0.001  # custom-resource request per task: a placement label, not a concurrency cap
EMBED_DIM = 384
# Config fields that change how the step runs or where it writes, never what the clips contain.
EXECUTION_ONLY_FIELDS = {
    "output",
    "rows_per_file",
    "embed_actors",
    "embed_batch_size",
    "embed_num_cpus",
    "decode_threads",
    "videos_per_task",
    "resource",
    "num_cpus_per_task",
    "s3_endpoint_url",
    "max_reject_fraction",
}
STAGING = ".staging"  # OUT/.staging/{clips,rejects}: where a run writes until it has succeeded

# Stage names in rejects/.
STAGE_READ, STAGE_CAPTION, STAGE_DEDUPE, STAGE_DECODE = "read", "caption", "dedupe", "decode"
STAGE_LABELS = "labels"


# ------------------------------------------------------------------------------------------------- schemas
def _pa():
    import pyarrow as pa

    return pa


def index_schema():
    pa = _pa()
    return pa.schema(
        [
            ("source", pa.string()),
            ("key", pa.string()),
            ("video_uri", pa.string()),
            ("offset", pa.int64()),  # -1: the whole object
            ("size", pa.int64()),
            ("caption", pa.string()),
            ("labels", pa.string()),
            ("dedupe_key", pa.string()),
            ("reason", pa.string()),
            ("stage", pa.string()),
            ("detail", pa.string()),
        ]
    )


def decoded_schema():
    pa = _pa()
    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("source", pa.string()),
            ("key", pa.string()),
            ("clip_index", pa.int32()),
            ("start_frame", pa.int32()),
            ("num_frames", pa.int32()),
            ("fps", pa.float32()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("frames", pa.large_binary()),
            ("caption", pa.string()),
            ("labels", pa.string()),
            ("node_id", pa.string()),
            ("reason", pa.string()),
            ("stage", pa.string()),
            ("detail", pa.string()),
        ]
    )


def reject_schema():
    pa = _pa()
    return pa.schema(
        [
            ("source", pa.string()),
            ("key", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
        ]
    )


def summary_schema():
    pa = _pa()
    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("source", pa.string()),
            ("key", pa.string()),
            ("clip_index", pa.int32()),
            ("node_id", pa.string()),
            ("split", pa.string()),
            ("file", pa.string()),
            ("reason", pa.string()),
            ("stage", pa.string()),
            ("detail", pa.string()),
        ]
    )


# ------------------------------------------------------------------------------------------------- helpers
def _row(source: str, key: str, **kw) -> dict:
    base = {
        "source": source,
        "key": key,
        "video_uri": None,
        "offset": -1,
        "size": -1,
        "caption": None,
        "labels": None,
        "dedupe_key": None,
        "reason": None,
        "stage": None,
        "detail": "",
    }
    base.update(kw)
    return base


def _reject(source: str, key: str, stage: str, reason: str, detail: str) -> dict:
    return _row(source, key, reason=reason, stage=stage, detail=detail[:500])


def _safe_key_text(name: str) -> str:
    return name.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


def is_unsafe_member_name(name: str) -> bool:
    """Absolute paths, ``..`` components, drive letters, NUL bytes: never used as a path, rejected."""
    if not name or "\x00" in name:
        return True
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[a-zA-Z]:", norm):
        return True
    return any(part == ".." for part in norm.split("/"))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/abc.seg.mp4`` → key ``dir/abc``, extension ``seg.mp4``."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    if m is None:
        return name, ""
    return m.group(1), m.group(2)


def _last_ext(ext: str) -> str:
    return ext.lower().rsplit(".", 1)[-1]


def clip_id(source: str, key: str, start_frame: int, num_frames: int, step: float) -> str:
    return hashlib.sha256(f"{source}\0{key}\0{start_frame}\0{num_frames}\0{step:g}".encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the Ray stages need from the config, as a small picklable object."""

    num_frames: int
    frame_stride: int
    target_fps: float | None
    size: int
    max_clips: int
    seed: int
    decode_threads: int
    text_encoder: str
    text_len: int
    caption_rules: dict
    max_caption_bytes: int

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> StepSettings:
        return cls(
            num_frames=cfg.num_frames,
            frame_stride=cfg.frame_stride,
            target_fps=cfg.target_fps,
            size=cfg.size,
            max_clips=cfg.max_clips_per_video,
            seed=cfg.seed,
            decode_threads=cfg.decode_threads,
            text_encoder=cfg.text_encoder,
            text_len=cfg.text_max_length,
            caption_rules=cfg.captions.model_dump(),
            max_caption_bytes=4 * cfg.captions.max_chars + 64,
        )

    def caption_filter(self):
        from pyoco.captions import CaptionFilter

        r = self.caption_rules
        return CaptionFilter(
            min_words=r["min_words"],
            max_words=r["max_words"],
            max_chars=r["max_chars"],
            min_letter_fraction=r["min_letter_fraction"],
            blocklist=r["blocklist"],
            dedupe=r["dedupe"],
        )


def _apply_caption(row: dict, raw: Any, settings: StepSettings, cf) -> dict:
    from pyoco.captions import dedupe_key

    res = cf.check(raw)
    if not res.ok:
        row.update(reason=res.reason, stage=STAGE_CAPTION, detail=res.detail[:500])
        return row
    row["caption"] = res.text
    row["dedupe_key"] = dedupe_key(res.text, settings.caption_rules["dedupe"])
    return row


# ------------------------------------------------------------------------------------------ input discovery
@dataclasses.dataclass
class InputPlan:
    kind: str  # webdataset | folder | ucf101
    shards: list[str] = dataclasses.field(default_factory=list)  # webdataset
    rows: list[dict] = dataclasses.field(default_factory=list)  # folder/ucf101: ready index rows
    ignored: int = 0  # files under the input that are not inputs of this kind


def _video_ext(uri: str) -> bool:
    return (
        _last_ext(uri.rsplit("/", 1)[-1].rsplit(".", 1)[-1]) in VIDEO_EXTS and "." in uri.rsplit("/", 1)[-1]
    )


def discover_inputs(uri: str, fmt: str, settings: StepSettings, options) -> InputPlan:
    """Find the inputs (listing only). Folder/UCF-101 captions are read and checked here, on the driver."""
    from pyoco import storage

    if storage.has_glob(uri):
        files = storage.glob_uris(uri, options=options)
        if not files:
            raise FileNotFoundError(f"{uri}: the glob matches no file")
        if fmt in ("auto", "webdataset"):
            return InputPlan("webdataset", shards=files)
        raise PyocoError(f"--input {uri}: a glob selects WebDataset shards; format {fmt!r} needs a folder")
    files = storage.list_files(uri, options=options)
    if not files:
        raise FileNotFoundError(f"{uri}: no files found")
    base = uri.rstrip("/")
    rel = {f: f[len(base) :].lstrip("/") if f.startswith(base) else f.rsplit("/", 1)[-1] for f in files}
    top = {r: f for f, r in rel.items() if "/" not in r}
    if fmt == "auto":
        if len(files) == 1 and files[0].lower().endswith(".tar") and rel[files[0]] in ("", files[0]):
            fmt = "webdataset"
        elif any(name in top for name in CAPTION_FILES):
            fmt = "folder"
        elif any(f.lower().endswith(".tar") for f in files):
            fmt = "webdataset"
        elif any(_video_ext(f) and rel[f].count("/") == 1 for f in files):
            fmt = "ucf101"
        else:
            raise PyocoError(
                f"--input {uri}: can't tell the format (no .tar shards, no captions.csv/.jsonl, no class "
                "folders of videos); set preprocess.format"
            )
    if fmt == "webdataset":
        shards = [f for f in files if f.lower().endswith(".tar")]
        if not shards:
            raise FileNotFoundError(f"{uri}: no .tar shards found")
        return InputPlan("webdataset", shards=shards, ignored=len(files) - len(shards))
    if fmt == "folder":
        return _plan_folder(base, files, rel, top, settings, options)
    if fmt == "ucf101":
        return _plan_ucf101(files, rel, settings)
    raise PyocoError(f"unknown format {fmt!r}")


def _read_caption_table(uri: str, options) -> list[tuple[str, Any, str]]:
    """``[(file, caption or bytes, where)]`` from captions.csv (columns file/path/video + caption/text)
    or captions.jsonl (keys likewise); unreadable lines become entries with ``caption=None``."""
    import csv

    from pyoco import storage

    data = storage.read_bytes(uri, options=options)
    out: list[tuple[str, Any, str]] = []
    name_keys = ("file", "path", "video", "filename", "name")
    cap_keys = ("caption", "text", "prompt")
    if uri.lower().endswith(".jsonl"):
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise PyocoError(f"{uri} line {lineno}: not JSON ({err})") from None
            name = next((obj[k] for k in name_keys if k in obj), None)
            if name is None:
                raise PyocoError(f"{uri} line {lineno}: no file/path/video field")
            out.append((str(name), next((obj[k] for k in cap_keys if k in obj), None), f"line {lineno}"))
        return out
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PyocoError(f"{uri}: not UTF-8 ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.lower() for f in (reader.fieldnames or [])]
    name_col = next((f for f in (reader.fieldnames or []) if f.lower() in name_keys), None)
    cap_col = next((f for f in (reader.fieldnames or []) if f.lower() in cap_keys), None)
    if name_col is None or cap_col is None:
        raise PyocoError(f"{uri}: needs a file column and a caption column (has {fields})")
    for lineno, rec in enumerate(reader, 2):
        out.append((str(rec.get(name_col) or ""), rec.get(cap_col), f"line {lineno}"))
    return out


def _plan_folder(base, files, rel, top, settings: StepSettings, options) -> InputPlan:
    from pyoco import storage

    cap_uri = top.get("captions.jsonl") or top.get("captions.csv")
    entries = _read_caption_table(cap_uri, options)
    videos = {rel[f]: f for f in files if _video_ext(f)}
    cf = settings.caption_filter()
    rows: list[dict] = []
    seen: set[str] = set()
    for name, caption, where in entries:
        source = storage.join(base, name) if name else cap_uri
        key = name or f"<{where}>"
        if key in seen:
            rows.append(
                _reject(source, f"{key} ({where})", STAGE_READ, "duplicate_entry", f"listed again at {where}")
            )
            continue
        seen.add(key)
        if not name or is_unsafe_member_name(name):
            rows.append(
                _reject(source, _safe_key_text(key), STAGE_READ, "unsafe_path", f"file name {name!r}")
            )
            continue
        if name not in videos:
            rows.append(
                _reject(source, key, STAGE_READ, "missing_video", f"{where} names a file that isn't there")
            )
            continue
        row = _row(source, key, video_uri=videos[name])
        rows.append(_apply_caption(row, caption, settings, cf))
    for name, uri in sorted(videos.items()):
        if name not in seen:
            rows.append(
                _reject(uri, name, STAGE_CAPTION, "caption_missing", "not listed in the captions file")
            )
    ignored = len(files) - len(videos) - 1
    return InputPlan("folder", rows=rows, ignored=ignored)


def _plan_ucf101(files, rel, settings: StepSettings) -> InputPlan:
    from pyoco.captions import class_name_caption

    cf = settings.caption_filter()
    rows = []
    n_videos = 0
    for f in files:
        r = rel[f]
        if not _video_ext(f) or r.count("/") != 1:
            continue
        n_videos += 1
        cls = r.split("/", 1)[0]
        row = _row(f, r, video_uri=f, labels=json.dumps({"class": cls}))
        rows.append(_apply_caption(row, class_name_caption(cls), settings, cf))
    if not rows:
        raise FileNotFoundError("no videos in class folders (expected ROOT/ClassName/video.ext)")
    return InputPlan("ucf101", rows=rows, ignored=len(files) - n_videos)


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
    """Ray Data UDF: a batch of shard URIs → their index rows."""
    import pyarrow as pa

    rows: list[dict] = []
    for uri in batch.column("shard").to_pylist():
        rows.extend(index_shard(uri, settings, options))
    return pa.Table.from_pylist(rows, schema=index_schema())


# ------------------------------------------------------------------------------------ stage 2: decode + clip
def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests, bench)
        return "local"


def decode_row(row: dict, settings: StepSettings, options, node_id: str = "local") -> list[dict]:
    """One index row → clip rows (``reason`` None) or one reject row.

    Transient storage errors are retried and, past the deadline, fail the step; a permanent one (gone,
    shrunk, forbidden) rejects this video. ``MemoryError`` always propagates: it is never bad data."""
    from pyoco import storage, video

    base = {
        "source": row["source"],
        "key": row["key"],
        "caption": row["caption"],
        "labels": row.get("labels"),
        "node_id": node_id,
        "clip_id": None,
        "clip_index": None,
        "start_frame": None,
        "num_frames": None,
        "fps": None,
        "height": None,
        "width": None,
        "frames": None,
        "reason": None,
        "stage": None,
        "detail": "",
    }
    uri = row["video_uri"]
    try:
        if row["offset"] is not None and row["offset"] >= 0:
            data = storage.read_range(uri, row["offset"], row["offset"] + row["size"], options=options)
        else:
            data = storage.read_bytes(uri, options=options)
    except Exception as err:  # noqa: BLE001 - sorted by _storage_reject; anything else re-raised
        reason = _storage_reject(err)
        if reason is None:
            raise
        detail = f"{uri}: {type(err).__name__}: {err}"[:500]
        return [{**base, "reason": reason, "stage": STAGE_READ, "detail": detail}]
    try:
        clips = video.decode_clips(
            data,
            num_frames=settings.num_frames,
            frame_stride=settings.frame_stride,
            target_fps=settings.target_fps,
            size=settings.size,
            max_clips=settings.max_clips,
            seed=settings.seed,
            key=f"{row['source']}\0{row['key']}",
            threads=settings.decode_threads,
        )
    except video.VideoDecodeError as err:
        return [{**base, "reason": err.reason, "stage": STAGE_DECODE, "detail": err.detail[:500]}]
    except MemoryError:
        raise  # the worker ran out of memory: not a property of the video
    except Exception as err:  # noqa: BLE001 - a decoder bug on odd input must not kill the job
        return [
            {
                **base,
                "reason": "decode_error",
                "stage": STAGE_DECODE,
                "detail": f"{type(err).__name__}: {err}"[:500],
            }
        ]
    out = []
    for i, c in enumerate(clips):
        t, h, w, _ = c.frames.shape
        step = (c.frame_indices[1] - c.frame_indices[0]) if len(c.frame_indices) > 1 else 1
        out.append(
            {
                **base,
                "clip_id": clip_id(row["source"], row["key"], c.start_frame, t, step),
                "clip_index": i,
                "start_frame": c.start_frame,
                "num_frames": t,
                "fps": c.fps,
                "height": h,
                "width": w,
                "frames": c.frames.tobytes(),
            }
        )
    return out


CRASH_TEST_ENV = "PYOCO_TEST_CRASH_ON_KEY"  # test hook: a decode task that meets this key kills its worker


def decode_rows(rows: list[dict], settings: StepSettings, options, crash_on_key: str | None = None):
    """Plain Ray task body: index rows → decoded clip rows and decode rejects (a pyarrow table).

    ``crash_on_key`` is a test hook (from ``$PYOCO_TEST_CRASH_ON_KEY`` on the driver): the worker exits
    with ``os._exit(1)`` on that key, as a segfaulting decoder or an OOM kill would end it.
    """
    import pyarrow as pa

    node = _node_id()
    out: list[dict] = []
    for row in rows:
        if crash_on_key is not None and row["key"] == crash_on_key:
            os._exit(1)
        out.extend(decode_row(row, settings, options, node))
    return pa.Table.from_pylist(out, schema=decoded_schema())


@functools.cache
def _decode_task():
    """:func:`decode_rows` as a Ray remote function (made once per process)."""
    import ray

    return ray.remote(decode_rows)


def _worker_died(err: BaseException) -> bool:
    """A task whose worker process died (segfault, ``os._exit``, OOM kill) rather than raised."""
    import ray.exceptions as rexc

    if isinstance(err, rexc.WorkerCrashedError | rexc.OutOfMemoryError):
        return True
    return isinstance(err, rexc.RayTaskError) and isinstance(
        getattr(err, "cause", None), rexc.WorkerCrashedError | rexc.OutOfMemoryError
    )


def _crash_reject(row: dict, err: BaseException) -> dict:
    return {
        **{name: None for name in decoded_schema().names},
        "source": row["source"],
        "key": row["key"],
        "caption": row["caption"],
        "node_id": "",
        "reason": "decode_crash",
        "stage": STAGE_DECODE,
        "detail": f"the decode worker died on this video, alone in its task ({type(err).__name__})",
    }


def decode_batch(batch, *, settings: StepSettings, options, task_args: dict, crash_on_key: str | None = None):
    """Ray Data UDF (tasks): index rows → decoded clip rows and decode rejects.

    The decoding itself runs in a plain Ray task (``task_args``: its CPUs and resource label; this UDF
    only waits, and Ray lends its CPU back while it does). A decoder that kills its worker process
    (FFmpeg segfault, OOM kill) cannot be caught in-process, and inside Ray Data it would fail the whole
    dataset. So when the batch's task dies (``WorkerCrashedError`` / ``OutOfMemoryError``), each of its
    videos is decoded again alone, in its own task; a video whose lone task dies again is recorded as
    ``decode_crash``, and the others keep their clips. Every row of the batch comes back exactly once.
    """
    import pyarrow as pa
    import ray

    rows = batch.to_pylist()
    if not rows:
        return pa.Table.from_pylist([], schema=decoded_schema())
    task = _decode_task().options(max_retries=0, **task_args)
    try:
        return ray.get(task.remote(rows, settings, options, crash_on_key))
    except Exception as err:  # noqa: BLE001 - only a dead worker is handled here
        if not _worker_died(err):
            raise
    alone = [task.remote([row], settings, options, crash_on_key) for row in rows]
    tables = []
    for row, ref in zip(rows, alone, strict=True):
        try:
            tables.append(ray.get(ref))
        except Exception as err:  # noqa: BLE001
            if not _worker_died(err):
                raise
            tables.append(pa.Table.from_pylist([_crash_reject(row, err)], schema=decoded_schema()))
    return pa.concat_tables(tables)


# ----------------------------------------------------------------------------------------- stage 3: embed
class CaptionEmbedder:
    """Ray Data actor: adds ``caption_embedding`` (L, 384) float32 and ``caption_mask`` (L,) bool."""

    def __init__(self, text_encoder: str = "minilm", text_len: int = 32, threads: int = 1):
        import torch

        from pyoco.text import load_text_encoder

        torch.set_num_threads(max(1, threads))
        self.text_len = text_len
        # Clips of one video (max_clips_per_video > 1) and class-named datasets repeat captions: an LRU of
        # recent captions' states saves re-encoding them (1024 x L x 384 x 4 B = 48 MiB at most for L=32).
        self.cache_size = 1024
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self.encoder = load_text_encoder(text_encoder, max_length=text_len)
        if getattr(self.encoder, "dim", EMBED_DIM) != EMBED_DIM:
            raise PyocoError(
                f"text encoder {text_encoder!r} has dim {self.encoder.dim}, clips store {EMBED_DIM}"
            )

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        n = batch.num_rows
        emb = np.zeros((n, self.text_len, EMBED_DIM), np.float32)
        mask = np.zeros((n, self.text_len), bool)
        reasons = batch.column("reason").to_pylist()
        captions = batch.column("caption").to_pylist()
        todo = [i for i in range(n) if reasons[i] is None]
        missing = sorted({captions[i] for i in todo} - self._cache.keys())
        if missing:
            e, m = self.encoder.encode(missing)
            e = np.asarray(e.detach().cpu().numpy() if hasattr(e, "detach") else e, np.float32)
            m = np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m, bool)
            for j, c in enumerate(missing):
                self._cache[c] = (e[j], m[j])
        for i in todo:
            emb[i], mask[i] = self._cache[captions[i]]
            self._cache.move_to_end(captions[i])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        # One flat fixed-size list per row (L * 384 floats, row-major (L, 384)): pyarrow 25's filter/take on
        # *sliced nested* fixed-size lists return garbage, and Ray Data slices blocks freely.
        emb_arr = pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float32()), self.text_len * EMBED_DIM
        )
        mask_arr = pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.bool_()), self.text_len)
        return batch.append_column("caption_embedding", emb_arr).append_column("caption_mask", mask_arr)


# ----------------------------------------------------------------------------------------- stage 4: write
def write_batch(batch, *, clips_uri: str, text_len: int, val_fraction: float, options):
    """Ray Data UDF (tasks): write the batch's clips to one parquet file per split (``clips/train/``,
    ``clips/val/``; the side of a clip is :func:`pyoco.clips.split_of` of its video's key); return one
    summary row per row.

    A file's name is a hash of its clip ids, so a retried task overwrites its own file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from pyoco import storage

    ok = pc.is_null(batch.column("reason")).to_pylist()
    keys = batch.column("key").to_pylist()
    splits = [clipfmt.split_of(k, val_fraction) if o else None for k, o in zip(keys, ok, strict=True)]
    files: list[str | None] = [None] * batch.num_rows
    emb_type = batch.schema.field(clipfmt.EMBEDDING).type
    embed_dim = emb_type.list_size // text_len if pa.types.is_fixed_size_list(emb_type) else 0
    for split in clipfmt.SPLITS:
        idx = [i for i, s in enumerate(splits) if s == split]
        if not idx:
            continue
        schema = clipfmt.clip_schema(text_len, embed_dim)
        table = batch.take(idx).select(schema.names).cast(schema)
        ids = "\n".join(sorted(table.column("clip_id").to_pylist()))
        file_name = f"{split}/part-{hashlib.sha256(ids.encode()).hexdigest()[:20]}.parquet"
        clipfmt.write_clip_table(table, storage.join(clips_uri, file_name), storage_options=options)
        for i in idx:
            files[i] = file_name
    if not batch.num_rows:
        return pa.Table.from_pylist([], schema=summary_schema())
    return pa.Table.from_arrays(
        [
            batch.column("clip_id"),
            batch.column("source"),
            batch.column("key"),
            batch.column("clip_index"),
            batch.column("node_id"),
            pa.array(splits, pa.string()),
            pa.array(files, pa.string()),
            batch.column("reason"),
            batch.column("stage"),
            batch.column("detail"),
        ],
        schema=summary_schema(),
    )


def drop_rejected(batch, *, duplicates: dict[str, str]):
    """Ray Data UDF: keep the index rows that passed every read/caption rule and are not duplicates."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.is_null(batch.column("reason"))
    if duplicates:
        idents = [
            f"{s}\0{k}"
            for s, k in zip(batch.column("source").to_pylist(), batch.column("key").to_pylist(), strict=True)
        ]
        keep = pc.and_(keep, pa.array([i not in duplicates for i in idents]))
    return batch.filter(keep)


# ------------------------------------------------------------------------------------------------ the step
class _RejectWriter:
    """Collects reject rows and writes them to ``rejects/part-NNNNN.parquet`` in bounded chunks."""

    def __init__(self, rejects_uri: str, options, rows_per_file: int = 100_000):
        self.uri = rejects_uri
        self.options = options
        self.rows_per_file = rows_per_file
        self.rows: list[dict] = []
        self.files: list[str] = []
        self.by_reason: Counter = Counter()

    def add(self, source: str, key: str, stage: str, reason: str, detail: str) -> None:
        self.rows.append(
            {"source": source, "key": key, "stage": stage, "reason": reason, "detail": detail or ""}
        )
        self.by_reason[reason] += 1
        if len(self.rows) >= self.rows_per_file:
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pyoco import storage

        if not self.rows and not (final and not self.files):
            return
        rows = sorted(self.rows, key=lambda r: (r["source"], r["key"]))
        table = pa.Table.from_pylist(rows, schema=reject_schema())
        name = f"part-{len(self.files):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(self.uri, name), buf.getvalue(), options=self.options)
        self.files.append(name)
        self.rows = []


def _init_ray(ray_address: str | None, resource: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (so it should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        cpus = os.cpu_count() or 1
        ray.init(
            num_cpus=cpus,
            resources={resource: cpus} if resource else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    return True


def _remote_args(cfg: PreprocessConfig, num_cpus: float) -> dict:
    """Ray options for one task/actor: CPUs plus the custom resource when some node has it."""
    import ray

    args: dict[str, Any] = {"num_cpus": num_cpus}
    if cfg.resource and ray.cluster_resources().get(cfg.resource, 0) > 0:
        args["resources"] = {cfg.resource: RESOURCE_FRACTION}
    return args


def _prepare_output(cfg: PreprocessConfig, options) -> tuple[str, str]:
    """Empty ``OUT/.staging/`` and return its ``(clips, rejects)`` URIs. The previous run's outputs in
    ``OUT/`` are not touched until this run has succeeded (:func:`_publish`)."""
    from pyoco import storage

    out = cfg.output.rstrip("/")
    if out == cfg.input.rstrip("/"):
        raise PyocoError(f"output {cfg.output} is the input folder; choose another output")
    staging = storage.join(out, STAGING)
    storage.remove(staging, options=options)  # a failed run's leftovers (this run starts afresh)
    clips_uri, rejects_uri = storage.join(staging, "clips"), storage.join(staging, "rejects")
    if not storage.is_remote(out):
        Path(clips_uri).mkdir(parents=True, exist_ok=True)
        Path(rejects_uri).mkdir(parents=True, exist_ok=True)
    return clips_uri, rejects_uri


OUTPUT_DIRS = ("clips", "rejects")
OUTPUT_FILES = ("manifest.json", "manifest.incomplete.json")


def _publish(out: str, manifest: dict, options) -> None:
    """Swap the staged ``clips/`` and ``rejects/`` in for the previous run's, then write ``manifest.json``
    last, so a manifest only ever sits next to the files it describes.

    Local: the old folders are renamed aside, the staged ones renamed in (atomic per folder), and the old
    ones deleted afterwards. S3 has no rename: the old manifest goes first, then the old objects, then the
    staged objects are copied in (server-side) and the manifest written; a crash in between leaves no
    manifest (the output reads as unfinished) and the staged copy intact.
    """
    import shutil
    import uuid

    from pyoco import storage

    out = out.rstrip("/")
    staging = storage.join(out, STAGING)
    body = json.dumps(manifest, indent=2).encode()
    if not storage.is_remote(out):
        root = Path(storage.filesystem(out)[1])
        trash = root / f".replaced-{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        for name in (*OUTPUT_FILES, *OUTPUT_DIRS):
            if (root / name).exists():
                os.replace(root / name, trash / name)
        for name in OUTPUT_DIRS:
            os.replace(root / STAGING / name, root / name)
        tmp = root / f".manifest.json.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(body)
        os.replace(tmp, root / "manifest.json")
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(root / STAGING, ignore_errors=True)
        return
    fs, path = storage.filesystem(out, options=options)
    for name in OUTPUT_FILES:
        storage.remove(storage.join(out, name), options=options)
    for name in OUTPUT_DIRS:
        storage.remove(storage.join(out, name), options=options)
        src = f"{path}/{STAGING}/{name}"
        if fs.exists(src):
            for f in fs.find(src):
                dst = f"{path}/{name}/{f[len(src) :].lstrip('/')}"
                storage.retry_transient(lambda f=f, dst=dst: fs.copy(f, dst), what=f"copy {f}")
    storage.write_bytes(storage.join(out, "manifest.json"), body, options=options)
    storage.remove(staging, options=options)


def _check_reject_fraction(cfg: PreprocessConfig, inputs: int, rejected: dict[str, int]) -> str | None:
    """A one-line problem when more than ``max_reject_fraction`` of the inputs were rejected."""
    total = sum(rejected.values())
    if inputs == 0 or total / inputs <= cfg.max_reject_fraction:
        return None
    top = ", ".join(f"{r} {n}" for r, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
    return (
        f"{total} of {inputs} inputs rejected ({total / inputs:.0%} > preprocess.max_reject_fraction "
        f"{cfg.max_reject_fraction:g}); top reasons: {top}"
    )


def rows_per_file(cfg: PreprocessConfig) -> int:
    """``cfg.rows_per_file``, lowered so that one file stays under ~256 MiB."""
    row_bytes = cfg.num_frames * cfg.size * cfg.size * 3 + cfg.text_max_length * (EMBED_DIM * 4 + 1) + 512
    return max(1, min(cfg.rows_per_file, MAX_FILE_BYTES // row_bytes))


def pyoco_version() -> str:
    try:
        from importlib.metadata import version

        return version("pyoco")
    except Exception:  # noqa: BLE001
        return "0+unknown"


def run_preprocess(
    cfg: PreprocessConfig,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    workflow_hash: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the step; returns the manifest (also written to ``OUT/manifest.json``).

    Raises PyocoError when the accounting invariant fails (nothing is reported as success then).
    ``on_progress(videos_done, videos_to_decode)`` is called on the driver as decoded videos come back.
    """
    import ray
    import ray.data

    from pyoco import storage

    started = time.monotonic()
    options = storage.StorageOptions.from_env(cfg.s3_endpoint_url)
    # What Ray tasks get: endpoint and region only. Credentials would live in the task specs and in the
    # serialized map functions (object store, which spills to disk); the workers read the AWS_* variables
    # (or their instance role) from their own environment instead.
    task_options = dataclasses.replace(options, key=None, secret=None, token=None)
    settings = StepSettings.from_config(cfg)
    settings.caption_filter()  # validate rules before starting anything
    plan = discover_inputs(cfg.input, cfg.format, settings, options)
    clips_uri, rejects_uri = _prepare_output(cfg, options)
    own_ray = _init_ray(ray_address, cfg.resource)
    try:
        ctx = ray.data.DataContext.get_current()
        saved_ctx = (ctx.enable_progress_bars, ctx.execution_options.preserve_order)
        ctx.enable_progress_bars = progress
        ctx.execution_options.preserve_order = False
        task_args = _remote_args(cfg, cfg.num_cpus_per_task)
        light_args = _remote_args(cfg, min(0.25, cfg.num_cpus_per_task))

        # Stage 1: index (per shard, in tasks) or ready rows (folder/ucf101, listed on the driver).
        if plan.kind == "webdataset":
            shards = ray.data.from_items(
                [{"shard": s} for s in plan.shards], override_num_blocks=len(plan.shards)
            )
            index = shards.map_batches(
                index_batch,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"settings": settings, "options": task_options},
                **light_args,
            )
        else:
            import pyarrow as pa

            index = ray.data.from_arrow(pa.Table.from_pylist(plan.rows, schema=index_schema()))
        index = index.materialize()

        # Driver pass over the small index: count inputs, ledger the rejects, resolve duplicates.
        rejects = _RejectWriter(rejects_uri, options)
        inputs = 0
        first_of: dict[str, tuple[str, str]] = {}  # dedupe key -> smallest (source, key)
        for b in index.iter_batches(batch_format="pyarrow", batch_size=4096):
            for r in b.select(["source", "key", "dedupe_key", "reason", "stage", "detail"]).to_pylist():
                inputs += 1
                if r["reason"] is not None:
                    rejects.add(r["source"], r["key"], r["stage"], r["reason"], r["detail"])
                elif r["dedupe_key"] is not None:
                    ident = (r["source"], r["key"])
                    cur = first_of.get(r["dedupe_key"])
                    if cur is None or ident < cur:
                        first_of[r["dedupe_key"]] = ident
        duplicates: dict[str, str] = {}
        if first_of:
            for b in index.iter_batches(batch_format="pyarrow", batch_size=4096):
                for r in b.select(["source", "key", "dedupe_key", "reason"]).to_pylist():
                    if r["reason"] is None and r["dedupe_key"] is not None:
                        first = first_of[r["dedupe_key"]]
                        if (r["source"], r["key"]) != first:
                            duplicates[f"{r['source']}\0{r['key']}"] = f"{first[0]}#{first[1]}"
                            rejects.add(
                                r["source"],
                                r["key"],
                                STAGE_DEDUPE,
                                "duplicate_caption",
                                f"same caption as {first[1]} in {first[0]}",
                            )
        first_of.clear()
        to_decode = inputs - sum(rejects.by_reason.values())

        # Stages 2-4, streaming: decode (tasks) → embed (actor pool) → write parquet (tasks) → summary.
        accepted_videos = clips_written = 0
        nodes: Counter = Counter()
        clip_files: set[str] = set()
        clips_digest = 0  # order-independent digest of every clip id written
        per_split = {sp: {"clips": 0, "videos": 0, "digest": 0} for sp in clipfmt.SPLITS}
        decode_seen = 0
        if to_decode > 0:
            per_file = rows_per_file(cfg)
            ds = (
                index.map_batches(
                    drop_rejected, batch_format="pyarrow", fn_kwargs={"duplicates": duplicates}, **light_args
                )
                .repartition(target_num_rows_per_block=cfg.videos_per_task)
                .map_batches(
                    decode_batch,
                    batch_size=None,
                    batch_format="pyarrow",
                    fn_kwargs={
                        "settings": settings,
                        "options": task_options,
                        "task_args": task_args,  # the decode task's; this UDF only waits for it
                        "crash_on_key": os.environ.get(CRASH_TEST_ENV) or None,
                    },
                    **light_args,
                )
                .map_batches(
                    CaptionEmbedder,
                    batch_size=cfg.embed_batch_size,
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=cfg.embed_actors),
                    fn_constructor_kwargs={
                        "text_encoder": cfg.text_encoder,
                        "text_len": cfg.text_max_length,
                        "threads": max(1, math.floor(cfg.embed_num_cpus)),
                    },
                    **_remote_args(cfg, cfg.embed_num_cpus),
                )
                .map_batches(
                    write_batch,
                    batch_size=per_file,
                    batch_format="pyarrow",
                    fn_kwargs={
                        "clips_uri": clips_uri,
                        "text_len": cfg.text_max_length,
                        "val_fraction": cfg.val_fraction,
                        "options": task_options,
                    },
                    **light_args,  # parquet + zstd of a few MB: a quarter CPU, so decode keeps its slots
                )
            )
            for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                before = decode_seen
                for r in b.to_pylist():
                    if r["reason"] is not None:
                        decode_seen += 1
                        rejects.add(r["source"], r["key"], r["stage"], r["reason"], r["detail"])
                        continue
                    clips_written += 1
                    clip_files.add(r["file"])
                    clips_digest = (clips_digest + int(r["clip_id"], 16)) % (1 << 128)
                    side = per_split[r["split"]]
                    side["clips"] += 1
                    side["digest"] = (side["digest"] + int(r["clip_id"], 16)) % (1 << 128)
                    if r["clip_index"] == 0:
                        decode_seen += 1
                        accepted_videos += 1
                        side["videos"] += 1
                        nodes[r["node_id"]] += 1
                if on_progress is not None and decode_seen != before:
                    on_progress(decode_seen, to_decode)
            if os.environ.get("PYOCO_DATA_STATS"):  # per-operator timings, for tuning
                console.print(ds.stats())
        rejects.flush(final=True)
    except (PyocoError, ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # Ray task errors: one line for the CLI, the cause chained for PYOCO_DEBUG
        first = " ".join(str(err).split())[:400]
        raise PyocoError(f"preprocess failed: {type(err).__name__}: {first}", exit_code=1) from err
    finally:
        if "saved_ctx" in locals():
            ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved_ctx
        if own_ray:
            ray.shutdown()

    rejected = dict(sorted(rejects.by_reason.items()))
    content_config = cfg.model_dump(mode="json", exclude=EXECUTION_ONLY_FIELDS)
    warnings = []
    if cfg.val_fraction > 0 and accepted_videos and per_split["val"]["videos"] == 0:
        warnings.append(
            f"val split is empty: none of the {accepted_videos} accepted videos hashed below val_fraction "
            f"{cfg.val_fraction} (the split is a per-video hash threshold, so tiny datasets can get no val "
            "video; add videos or raise preprocess.val_fraction)"
        )
        console.print(f"[yellow]warning:[/] {warnings[-1]}")
    manifest = {
        "pyoco_version": pyoco_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": cfg.input,
        "output": cfg.output,
        "format": plan.kind,
        "config_hash": config_hash(cfg.model_dump(mode="json")),
        "workflow_config_hash": workflow_hash,
        "config": cfg.model_dump(mode="json"),
        "inputs": inputs,
        "accepted_videos": accepted_videos,
        "clips_written": clips_written,
        "train_videos": per_split["train"]["videos"],
        "val_videos": per_split["val"]["videos"],
        "train_clips": per_split["train"]["clips"],
        "val_clips": per_split["val"]["clips"],
        "val_fraction": cfg.val_fraction,
        "split_rule": "val iff sha256(key)[:8] / 2**64 < val_fraction (pyoco.clips.split_of)",
        "rejected": rejected,
        "invariant": "inputs == accepted_videos + sum(rejected.values())",
        # Same inputs + config -> same data_hash, whatever the cluster (file names depend on batching).
        "data_hash": config_hash(
            {
                "config": content_config,
                "inputs": inputs,
                "rejected": rejected,
                "clips": clips_digest,
            }
        ),
        # What evaluate measures on: the val clip ids and the config that shapes their content. Metrics with
        # different eval_data_hash were computed on different clips and are not comparable.
        "eval_data_hash": config_hash(
            {
                "config": {k: v for k, v in content_config.items() if k not in ("input", "val_fraction")},
                "val_clips": per_split["val"]["clips"],
                "val_digest": per_split["val"]["digest"],
            }
        ),
        "warnings": warnings,
        "clip_files": sorted(clip_files),
        "reject_files": rejects.files,
        "ignored_files": plan.ignored,
        "decode_nodes": dict(sorted(nodes.items())),
        "clip_shape": [cfg.num_frames, cfg.size, cfg.size, 3],
        "caption_embedding": {
            "encoder": cfg.text_encoder,
            "shape": [cfg.text_max_length, EMBED_DIM],
            "dtype": "float32",
            "level": "token",
        },
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    problems = []
    if inputs != accepted_videos + sum(rejected.values()):
        problems.append(f"inputs {inputs} != accepted {accepted_videos} + rejected {sum(rejected.values())}")
    if decode_seen != to_decode:
        problems.append(f"{to_decode} videos went to decode but {decode_seen} came back")
    failure = "preprocess accounting failed: " + "; ".join(problems) if problems else None
    if failure is None:
        too_many = _check_reject_fraction(cfg, inputs, rejected)
        failure = f"preprocess failed: {too_many}" if too_many else None
    if failure is not None:
        # The previous outputs stay as they were; this run's are kept in OUT/.staging/ for inspection.
        staging = storage.join(cfg.output, STAGING)
        storage.write_bytes(
            storage.join(staging, "manifest.incomplete.json"),
            json.dumps(manifest, indent=2).encode(),
            options=options,
        )
        raise PyocoError(f"{failure} (this run's outputs are in {staging}; {cfg.output} is unchanged)", 1)
    _publish(cfg.output, manifest, options)
    return manifest


# ----------------------------------------------------------------------------------------------------- CLI
def load_preprocess_config(path: str | None, overrides: dict[str, Any]) -> tuple[PreprocessConfig, dict]:
    """The preprocess section of a workflow YAML, or a YAML of bare preprocess fields; plus extras
    (``ray_address``, ``workflow_hash``)."""
    data = read_yaml(path) if path else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    extras: dict[str, Any] = {}
    workflow = "preprocess" in data or bool(set(data) - set(PreprocessConfig.model_fields))
    if workflow:
        section = data.get("preprocess") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: preprocess: must be a mapping")
        data = dict(data)
        data["preprocess"] = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        full = parse_config(data, source=str(path))
        assert isinstance(full, PyocoConfig)
        extras["ray_address"] = full.ray.address
        extras["workflow_hash"] = full.hash()
        return full.preprocess, extras  # type: ignore[return-value]
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = parse_config(data, source=str(path or "<flags>"), model=PreprocessConfig)
    return cfg, extras  # type: ignore[return-value]


def print_summary(manifest: dict) -> None:
    from rich.table import Table

    table = Table(title=f"preprocess: {manifest['input']} → {manifest['output']}")
    table.add_column("outcome")
    table.add_column("videos", justify="right")
    table.add_row("inputs", str(manifest["inputs"]))
    table.add_row("accepted", str(manifest["accepted_videos"]))
    for reason, n in manifest["rejected"].items():
        table.add_row(f"rejected: {reason}", str(n))
    table.add_row("clips written", str(manifest["clips_written"]))
    for split in ("train", "val"):
        if f"{split}_videos" in manifest:
            table.add_row(
                f"  {split}", f"{manifest[f'{split}_videos']} videos, {manifest[f'{split}_clips']} clips"
            )
    console.print(table)
    console.print(
        f"invariant holds: {manifest['inputs']} = {manifest['accepted_videos']} + "
        f"{sum(manifest['rejected'].values())}; manifest at {manifest['output'].rstrip('/')}/manifest.json "
        f"({manifest['elapsed_s']} s)"
    )


def register(app: typer.Typer) -> None:
    @app.command("preprocess")
    @cli_errors
    def preprocess_cmd(
        config: Path | None = typer.Option(
            None, "--config", help="Workflow YAML (its preprocess: section) or a YAML of preprocess fields."
        ),
        input: str | None = typer.Option(
            None, "--input", help="Shards folder / glob / s3:// prefix, or a video folder."
        ),
        output: str | None = typer.Option(None, "--output", help="Output folder or s3:// prefix."),
        format: str | None = typer.Option(None, "--format", help="auto | webdataset | folder | ucf101."),
        num_frames: int | None = typer.Option(None, "--num-frames", help="Frames per clip."),
        size: int | None = typer.Option(None, "--size", help="Output frame size (square, px)."),
        max_clips: int | None = typer.Option(None, "--max-clips", help="Most clips per video."),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="Ray cluster (default: $RAY_ADDRESS or local)."
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide Ray Data progress bars."),
    ) -> None:
        """Turn raw video shards into training clips (parquet), rejects/ and manifest.json."""
        overrides = {
            "input": input,
            "output": output,
            "format": format,
            "num_frames": num_frames,
            "size": size,
            "max_clips_per_video": max_clips,
        }
        if config is None and (input is None or output is None):
            raise PyocoError("give --config FILE, or both --input and --output")
        cfg, extras = load_preprocess_config(str(config) if config else None, overrides)
        manifest = run_preprocess(
            cfg,
            ray_address=ray_address or extras.get("ray_address"),
            progress=not no_progress,
            workflow_hash=extras.get("workflow_hash"),
        )
        print_summary(manifest)
