"""Stages 2-4 on Ray Data: decode + clip (tasks), caption embedding (actor pool) and parquet writing.

Over 400 lines: the three stages share the decoded row layout and the crash-isolation path of decode; split
by stage, each module would re-import the others' helpers (a follow-up can move stage 3 to its own file)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter, OrderedDict

from pipelines.preprocess.discover import StepSettings
from pipelines.preprocess.ledger import STAGE_DECODE, STAGE_MOTION, STAGE_READ
from pipelines.preprocess.schemas import decoded_schema, summary_schema
from pipelines.preprocess.tar_index import _storage_reject
from pyoco import clips as clipfmt

EMBED_DIM = 384  # MiniLM's width (pyoco.text.MINILM_DIM); other encoders give their own (enc.dim)


def clip_id(source: str, key: str, start_frame: int, num_frames: int, step: float) -> str:
    return hashlib.sha256(f"{source}\0{key}\0{start_frame}\0{num_frames}\0{step:g}".encode()).hexdigest()[:24]


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
        "motion": None,
        "dropped": None,
        "reason": None,
        "stage": None,
        "detail": "",
        "unit": row.get("unit"),
        "video_clips": 1,
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
            shot_aware=settings.shot_aware,
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
    kept, motions, dropped = _clip_quality(clips, settings)
    if not kept:
        reason = max(dropped, key=lambda r: (dropped[r], r == "static"))
        detail = f"all {len(clips)} clips dropped: " + ", ".join(
            f"{r} {n}" for r, n in sorted(dropped.items())
        )
        detail += (
            f" (motion {max(motions):.2e} < min_motion {settings.min_motion:g})" if reason == "static" else ""
        )
        return [{**base, "reason": reason, "stage": STAGE_MOTION, "detail": detail[:500]}]
    out = []
    for i, (c, motion) in enumerate(zip(kept, motions, strict=True)):
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
                "motion": motion,
                "dropped": json.dumps(dict(sorted(dropped.items()))) if i == 0 and dropped else None,
                "video_clips": len(kept),
            }
        )
    return out


def _clip_quality(clips: list, settings: StepSettings) -> tuple[list, list[float], Counter]:
    """``(kept clips, their motion scores, Counter of dropped clips by reason)``: a clip below
    ``min_motion`` is ``static``, one above ``max_jitter_px`` is ``jitter`` (:mod:`pyoco.shots`). When
    every clip is dropped, the motion list holds all the clips' scores (for the reject's detail)."""
    from pyoco import shots

    kept, kept_motion, all_motion, dropped = [], [], [], Counter()
    for c in clips:
        m = shots.motion_score(c.frames)
        all_motion.append(m)
        if m < settings.min_motion:
            dropped["static"] += 1
        elif settings.max_jitter_px is not None and shots.jitter_score(c.frames) > settings.max_jitter_px:
            dropped["jitter"] += 1
        else:
            kept.append(c)
            kept_motion.append(m)
    return kept, (kept_motion if kept else all_motion), dropped


CRASH_TEST_ENV = "PYOCO_TEST_CRASH_ON_KEY"  # test hook: a decode task that meets this key kills its worker


def decode_rows(rows: list[dict], settings: StepSettings, options, crash_on_key: str | None = None):
    """Plain Ray task body: index rows → decoded clip rows and decode rejects (a pyarrow table).

    ``crash_on_key`` is a test hook (from ``$PYOCO_TEST_CRASH_ON_KEY`` on the driver): the worker exits
    with ``os._exit(1)`` on that key, as a segfaulting decoder or an OOM kill would end it.
    """
    return _concat_decoded(
        list(decode_stream(rows, settings, options, crash_on_key, chunk=max(1, len(rows))))
    )


def decode_stream(rows: list[dict], settings: StepSettings, options, crash_on_key: str | None, chunk: int):
    """Streaming Ray task body (one per unit): yields a table of decoded rows per ``chunk`` videos, so a
    shard's frames never sit in one object; every yielded table holds all the rows of its videos."""
    import pyarrow as pa

    node = _node_id()
    for start in range(0, len(rows), chunk):
        out: list[dict] = []
        for row in rows[start : start + chunk]:
            if crash_on_key is not None and row["key"] == crash_on_key:
                os._exit(1)
            t0 = time.perf_counter()
            rows_of_video = decode_row(row, settings, options, node)
            rows_of_video[0]["decode_s"] = time.perf_counter() - t0
            out.extend(rows_of_video)
        yield pa.Table.from_pylist(out, schema=decoded_schema())


def _concat_decoded(tables: list):
    import pyarrow as pa

    return pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema=decoded_schema())


@functools.cache
def _decode_task():
    """:func:`decode_rows` as a Ray remote function (made once per process)."""
    import ray

    return ray.remote(decode_rows)


@functools.cache
def _decode_stream_task():
    """:func:`decode_stream` as a streaming-generator Ray remote function (made once per process)."""
    import ray

    return ray.remote(decode_stream)


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
        "unit": row.get("unit"),
        "video_clips": 1,
        "detail": f"the decode worker died on this video, alone in its task ({type(err).__name__})",
    }


def decode_batch(
    batch,
    *,
    settings: StepSettings,
    options,
    task_args: dict,
    crash_on_key: str | None = None,
    chunk: int = 4,
    shared_ref=None,
):
    """Ray Data UDF (tasks; a generator): one unit's index rows → decoded clip rows and decode rejects.

    The decoding itself runs in *one* plain Ray task per unit (``task_args``: its CPUs, resource label and
    node: the unit's node in ``shared_ref``'s placement, else SPREAD; this UDF only waits, and Ray lends its CPU back while it does), a streaming
    generator that yields every ``chunk`` videos (at most two tables in flight), so memory stays bounded
    by the chunk, not the shard. A decoder that kills its worker process (FFmpeg segfault, OOM kill)
    cannot be caught in-process, and inside Ray Data it would fail the whole dataset. So when the unit's
    task dies (``WorkerCrashedError`` / ``OutOfMemoryError``), each of its videos not yet returned is
    decoded again alone, in its own task; a video whose lone task dies again is recorded as
    ``decode_crash``, and the others keep their clips. Every row of the batch comes back exactly once.
    """
    import pyarrow as pa
    import ray

    rows = batch.to_pylist()
    if not rows:
        return
    node = shared(shared_ref)[2].get(rows[0]["unit"]) if shared_ref is not None else None
    if node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task_args = {**task_args, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}
    stream = _decode_stream_task().options(
        max_retries=0, num_returns="streaming", _generator_backpressure_num_objects=2, **task_args
    )
    back: set[tuple[str, str]] = set()
    try:
        for ref in stream.remote(rows, settings, options, crash_on_key, chunk):
            table = ray.get(ref)
            back.update(zip(table.column("source").to_pylist(), table.column("key").to_pylist(), strict=True))
            yield table
        return
    except Exception as err:  # noqa: BLE001 - only a dead worker is handled here
        if not _worker_died(err):
            raise
    rest = [r for r in rows if (r["source"], r["key"]) not in back]
    task = _decode_task().options(max_retries=0, **task_args)
    alone = [task.remote([row], settings, options, crash_on_key) for row in rest]
    for row, ref in zip(rest, alone, strict=True):
        try:
            yield ray.get(ref)
        except Exception as err:  # noqa: BLE001
            if not _worker_died(err):
                raise
            yield pa.Table.from_pylist([_crash_reject(row, err)], schema=decoded_schema())


# ----------------------------------------------------------------------------------------- stage 3: embed
class CaptionEmbedder:
    """Ray Data actor: adds ``caption_embedding`` (L, D) float32 and ``caption_mask`` (L,) bool; D is the
    encoder's width (``enc.dim``: 384 for MiniLM, CLIP's hidden size). Called on whole blocks (one unit,
    or a piece of a big one), so units never mix; it encodes ``batch_size`` captions at a time. ``storage_options``: where a CLIP
    folder is read from (`pyoco.storage.loader_options`: an endpoint, never credentials). ``device``: the
    driver's choice (:func:`pipelines.preprocess.placement.devices`; "cuda" only for an actor given a GPU);
    None: CUDA when this process sees a GPU."""

    def __init__(
        self,
        text_encoder: str = "minilm",
        text_len: int = 32,
        threads: int = 1,
        storage_options: dict | None = None,
        device: str | None = None,
        batch_size: int = 64,
    ):
        import torch

        from pyoco.text import load_text_encoder

        torch.set_num_threads(max(1, threads))
        self.text_len = text_len
        self.batch_size = max(1, batch_size)  # captions per encoder call (the UDF gets a whole unit)
        # Clips of one video (max_clips_per_video > 1) and class-named datasets repeat captions: an LRU of
        # recent captions' states saves re-encoding them (1024 x L x D x 4 B: 48 MiB for MiniLM at L=32).
        self.cache_size = 1024
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        remote = {} if text_encoder.lower() == "minilm" else {"storage_options": storage_options}
        self.encoder = load_text_encoder(text_encoder, max_length=text_len, device=device, **remote)
        self.dim = int(self.encoder.dim)

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        n = batch.num_rows
        emb = np.zeros((n, self.text_len, self.dim), np.float32)
        mask = np.zeros((n, self.text_len), bool)
        reasons = batch.column("reason").to_pylist()
        captions = batch.column("caption").to_pylist()
        todo = [i for i in range(n) if reasons[i] is None]
        missing = sorted({captions[i] for i in todo} - self._cache.keys())
        for start in range(0, len(missing), self.batch_size):
            part = missing[start : start + self.batch_size]
            e, m = self.encoder.encode(part)
            e = np.asarray(e.detach().cpu().numpy() if hasattr(e, "detach") else e, np.float32)
            m = np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m, bool)
            for j, c in enumerate(part):
                self._cache[c] = (e[j], m[j])
        for i in todo:
            emb[i], mask[i] = self._cache[captions[i]]
            self._cache.move_to_end(captions[i])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        # One flat fixed-size list per row (L * D floats, row-major (L, D)): pyarrow 25's filter/take on
        # *sliced nested* fixed-size lists return garbage, and Ray Data slices blocks freely.
        emb_arr = pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float32()), self.text_len * self.dim
        )
        mask_arr = pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.bool_()), self.text_len)
        return batch.append_column("caption_embedding", emb_arr).append_column("caption_mask", mask_arr)


# ----------------------------------------------------------------------------------------- stage 4: write
def write_batch(
    batch,
    *,
    clips_uri: str,
    text_len: int,
    val_fraction: float,
    options,
    rows_per_file: int = 256,
    latents=None,
):
    """Ray Data UDF (tasks, on whole blocks: one unit, or one piece of a unit too big for one block): write
    the batch's clips to parquet files per split and unit (``clips/train/``, ``clips/val/``; the side of a
    clip is :func:`pyoco.clips.split_of` of its video's key), each of at most ``rows_per_file`` rows taken
    in clip-id order; return one summary row per row. No file mixes two units, so a unit redone after a
    kill leaves no half of itself in another's file.

    A file's name is a hash of its clip ids, so a retried task overwrites its own file, and two runs over
    the same input write the same files: the rows of a block, hence of its files, are a function of the
    unit's content (decode yields its videos in index order; Ray Data cuts its output into blocks by byte
    size only, ``DataContext.target_max_block_size``). ``latents``: the
    `pipelines.preprocess.latents.LatentPlan` when the rows carry a latents column.
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
    units = batch.column("unit").to_pylist()
    ids = batch.column("clip_id").to_pylist()
    groups: dict[tuple[str, str], list[int]] = {}  # (split, unit) -> rows: a file holds one unit's clips
    for i, (sp, u) in enumerate(zip(splits, units, strict=True)):
        if sp is not None:
            groups.setdefault((sp, u or ""), []).append(i)
    schema = clipfmt.clip_schema(
        text_len,
        embed_dim,
        latent_shape=latents.shape if latents else None,
        vae_identity=latents.identity if latents else None,
    )
    per_file = max(1, rows_per_file)
    for (split, _unit), rows in sorted(groups.items()):
        rows.sort(key=lambda i: ids[i])
        for start in range(0, len(rows), per_file):
            idx = rows[start : start + per_file]
            table = batch.take(idx).select(schema.names).cast(schema)
            digest = hashlib.sha256("\n".join(ids[i] for i in idx).encode()).hexdigest()[:20]
            file_name = f"{split}/part-{digest}.parquet"
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
            batch.column("dropped"),
            batch.column("reason"),
            batch.column("stage"),
            batch.column("detail"),
            batch.column("unit"),
            batch.column("video_clips"),
            batch.column("decode_s"),
        ],
        schema=summary_schema(),
    )


_SHARED: dict[str, object] = {}  # per worker process: objects of the object store, fetched once


def shared(ref):
    """``ray.get(ref)``, once per worker process: the duplicate table is put in the object store once by
    the driver, and each worker deserializes it once, not once per task."""
    import ray

    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()  # one run's table at a time
        _SHARED[key] = ray.get(ref)
    return _SHARED[key]


def drop_rejected(batch, *, shared_ref):
    """Ray Data UDF: keep the index rows that passed every read/caption rule, are not duplicates and whose
    unit is not already done (``shared_ref``: an object ref of ``(duplicates, done_units, placement)``:
    sets of ``source\\0key`` and unit names, and ``{unit: node id}``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    duplicates, done, _ = shared(shared_ref)
    keep = pc.is_null(batch.column("reason"))
    if duplicates or done:
        sources, keys = batch.column("source").to_pylist(), batch.column("key").to_pylist()
        units = batch.column("unit").to_pylist()
        flags = [
            f"{s}\0{k}" not in duplicates and u not in done
            for s, k, u in zip(sources, keys, units, strict=True)
        ]
        keep = pc.and_(keep, pa.array(flags))
    return batch.filter(keep)
