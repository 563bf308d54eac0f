"""The rows of the preprocess step: the Arrow schemas of the index, decoded clips, rejects and the per-row
summary, and the index/reject row builders."""

from __future__ import annotations


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
            ("unit", pa.string()),  # the work unit (resume grain): the shard, or a chunk of a folder
            ("stamp", pa.string()),  # "size:etag-or-mtime" of the unit's input (pipelines.preprocess.units)
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
            ("motion", pa.float32()),
            ("dropped", pa.string()),  # clip_index 0 only: JSON {reason: clips dropped} of the video
            ("reason", pa.string()),
            ("stage", pa.string()),
            ("detail", pa.string()),
            ("unit", pa.string()),
            ("video_clips", pa.int32()),  # clips kept of this row's video (1 on a reject row)
            ("decode_s", pa.float32()),  # seconds spent decoding this row's video (its first row only)
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
            ("dropped", pa.string()),
            ("reason", pa.string()),
            ("stage", pa.string()),
            ("detail", pa.string()),
            ("unit", pa.string()),
            ("video_clips", pa.int32()),
            ("decode_s", pa.float32()),
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
        "unit": None,
        "stamp": None,
    }
    base.update(kw)
    return base


def _reject(source: str, key: str, stage: str, reason: str, detail: str) -> dict:
    return _row(source, key, reason=reason, stage=stage, detail=detail[:500])
