"""The clip format: schema, writer and reader of clip rows (pure pyarrow/numpy; no ray, no mlflow).

Preprocess writes it, train and evaluate read it, the tests build fixtures with it; nothing else knows the
layout. A preprocess output folder ``DATA``::

    DATA/clips/train/part-*.parquet   clips of the training videos
    DATA/clips/val/part-*.parquet     clips of the held-out videos (evaluate reads only these)
    DATA/manifest.json                counts (train_clips, val_clips, train_videos, val_videos), eval_data_hash

Every clip of one source video lands on the same side: :func:`split_of` hashes the video's *key* (the
WebDataset sample key, or the file's path relative to the input folder), not its storage location, so a
copy of the data in another bucket splits the same way, and the side of a video never depends on which
other videos are in the dataset (adding videos never moves one).

Columns (one row per clip):

- ``clip_id`` (stable hash of source/key/start), ``source`` (URI of the shard or file), ``key``,
  ``clip_index``, ``start_frame``, ``num_frames``, ``fps``, ``height``, ``width``;
- ``frames``: uint8 ``(T, H, W, 3)`` C-order bytes (``large_binary``; see :func:`frames_array`);
- ``caption`` (cleaned text);
- ``caption_embedding``: float32 ``(L, D)`` token states of the text encoder, stored row-major as one
  fixed-size list of ``L * D`` floats whose field metadata says ``shape: [L, D]`` (see
  :func:`embedding_arrays`). L and D follow the encoder (MiniLM: 32 × 384 by default; CLIP: 77 × its
  hidden size) and are read from that metadata, never assumed;
- ``caption_mask``: bool ``(L,)``, True = real token;
- ``labels``: nullable JSON object text: a WebDataset sample's ``.json`` object as-is (the synth ground
  truth: shape, color, direction, speed, ...), ``{"class": NAME}`` for a ``.cls`` member or a UCF-101 class
  folder, null when the input has none (see :func:`labels_of`);
- ``node_id``: the Ray node that decoded the clip;
- ``motion``: float32, the clip's :func:`pyoco.shots.motion_score` (mean thresholded frame difference, as a
  fraction of the 8-bit range per frame step; 0 = frozen; preprocess rejects clips below
  ``preprocess.min_motion``, default :data:`pyoco.shots.STATIC_MOTION`). Null in files written without it.
- ``latents`` (optional, when preprocess ran the VAE): the clip's VAE latents ``(C, T, h, w)``, already
  multiplied by the VAE's scaling factor (shift applied), as **little-endian IEEE float16** C-order bytes
  (``large_binary`` like ``frames``; bf16 has no numpy or parquet type). Field metadata: ``shape: [C, T, h,
  w]``, ``dtype: "float16"``, ``vae_identity`` (`pyoco.vae.vae_identity` of the VAE that made them).
  float16 keeps ~3 significant digits over ±65504; scaled SD latents lie within about ±10. Read them with
  :func:`latents_tensor` (float32 torch).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

from pyoco.errors import InputError

SPLITS = ("train", "val")
CLIPS_DIR = "clips"
EMBEDDING = "caption_embedding"
MASK = "caption_mask"
LABELS = "labels"
LATENTS = "latents"
MOTION = "motion"
LATENTS_DTYPE = np.dtype("<f2")  # see the module docstring: float16 bytes, shape/identity in field metadata


class DataError(InputError):
    """Clip files are missing or do not have the expected columns; the message names the file and column."""


NO_FRAMES = "frames are null: the clips hold latents only (preprocessed with preprocess.keep_frames: false)"


# ------------------------------------------------------------------------------------------------- schema
def clip_schema(
    text_len: int,
    embed_dim: int,
    *,
    latent_shape: tuple[int, int, int, int] | None = None,
    vae_identity: str | None = None,
) -> pa.Schema:
    """The clip table schema for ``(L, D) = (text_len, embed_dim)`` caption states, plus a ``latents``
    column of ``latent_shape = (C, T, h, w)`` when given (``vae_identity`` is then required)."""
    schema = pa.schema(
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
            pa.field(
                EMBEDDING,
                pa.list_(pa.float32(), text_len * embed_dim),
                metadata={"shape": json.dumps([text_len, embed_dim])},
            ),
            (MASK, pa.list_(pa.bool_(), text_len)),
            (LABELS, pa.string()),
            ("node_id", pa.string()),
            (MOTION, pa.float32()),
        ]
    )
    if latent_shape is not None:
        schema = schema.append(latents_field(latent_shape, vae_identity))
    return schema


def latents_field(latent_shape: tuple[int, ...], vae_identity: str | None) -> pa.Field:
    """The ``latents`` field: float16 bytes of ``(C, T, h, w)``, its shape and VAE identity in metadata."""
    shape = [int(d) for d in latent_shape]
    if len(shape) != 4 or min(shape) < 1:
        raise DataError(f"latents shape {shape} is not [C, T, h, w]")
    if not vae_identity:
        raise DataError("a latents column needs the vae_identity of the VAE that made it")
    meta = {"shape": json.dumps(shape), "dtype": LATENTS_DTYPE.name, "vae_identity": vae_identity}
    return pa.field(LATENTS, pa.large_binary(), metadata=meta)


def latents_array(latents: Any) -> pa.Array:
    """A ``latents`` column (``large_binary``, float16 bytes) from ``(B, C, T, h, w)`` floats (numpy or torch)."""
    if hasattr(latents, "detach"):
        latents = latents.detach().to("cpu").float().numpy()
    arr = np.asarray(latents)
    if arr.ndim != 5:
        raise DataError(f"latents must be (B, C, T, h, w), got shape {arr.shape}")
    with np.errstate(over="ignore"):  # reported below, as one line
        half = np.ascontiguousarray(arr, dtype=LATENTS_DTYPE)
    if not np.isfinite(half).all():
        raise DataError("latents overflow float16 (non-finite values); the VAE output is not scaled")
    return pa.array([row.tobytes() for row in half], pa.large_binary())


def latents_info(schema: pa.Schema) -> tuple[tuple[int, int, int, int], str] | None:
    """``((C, T, h, w), vae_identity)`` from the ``latents`` field metadata; None when there is no column."""
    if LATENTS not in schema.names:
        return None
    meta = schema.field(LATENTS).metadata or {}
    try:
        shape = tuple(int(d) for d in json.loads(meta[b"shape"]))
        identity = meta[b"vae_identity"].decode()
        dtype = meta.get(b"dtype", b"float16").decode()
    except (KeyError, ValueError) as err:
        raise DataError(f"latents field metadata lacks shape/vae_identity ({err})") from None
    if dtype != LATENTS_DTYPE.name or len(shape) != 4:
        raise DataError(f"latents field is {dtype} {list(shape)}, expected float16 [C, T, h, w]")
    return shape, identity  # type: ignore[return-value]


def latents_tensor(values: Any, shape: tuple[int, int, int, int] | None = None):
    """float32 torch ``(B, C, T, h, w)`` from a clips table (shape from its metadata), its ``latents``
    column, or a sequence of the raw bytes (a Ray Data batch column; pass ``shape``)."""
    import torch

    if isinstance(values, pa.Table):
        info = latents_info(values.schema)
        if info is None:
            raise DataError("clips have no latents column (preprocess ran without preprocess.latents)")
        shape = shape or info[0]
        values = values.column(LATENTS)
    if shape is None:
        raise ValueError("latents_tensor: pass a clips table or the (C, T, h, w) shape")
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_pylist()
    per_clip = int(np.prod(shape))
    buf = np.frombuffer(b"".join(bytes(v) for v in values), dtype=LATENTS_DTYPE)
    if buf.size != len(values) * per_clip:
        raise DataError(f"latents hold {buf.size} values, expected {len(values)} x {list(shape)}")
    return torch.from_numpy(buf.astype(np.float32)).reshape(len(values), *shape)


def embedding_shape(schema_or_field) -> tuple[int, int] | None:
    """``(L, D)`` from the ``caption_embedding`` field metadata; None when the field has none."""
    field = schema_or_field.field(EMBEDDING) if isinstance(schema_or_field, pa.Schema) else schema_or_field
    meta = field.metadata or {}
    if b"shape" not in meta:
        return None
    shape = [int(d) for d in json.loads(meta[b"shape"])]
    if len(shape) != 2:
        raise DataError(f"caption_embedding metadata shape {shape} is not [L, D]")
    return shape[0], shape[1]


# ------------------------------------------------------------------------------------------------- split
def split_score(key: str) -> float:
    """A uniform number in [0, 1) from the video's key (sha256; the same on every machine and run)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` when the key's score is below ``val_fraction``, else ``"train"``.

    A threshold on a per-video hash: a video's side depends on nothing but its key and ``val_fraction``,
    so adding or removing other videos never moves it, and raising ``val_fraction`` only moves videos from
    train to val. The price: on very small datasets val can come out empty (about ``(1 - f) ** n`` for
    ``n`` videos); preprocess records that in the manifest's ``warnings``.
    """
    return "val" if split_score(key) < val_fraction else "train"


def split_uri(data_uri: str, split: str) -> str:
    """``DATA/clips/<split>``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pyoco.storage import join

    return join(data_uri, CLIPS_DIR, split)


# ------------------------------------------------------------------------------------------------- write
def write_clip_table(
    table_or_rows, uri: str, *, vae_identity: str | None = None, storage_options=None
) -> str:
    """Write one parquet file (zstd) at ``uri``; rows (a list of dicts) are cast to :func:`clip_schema`,
    whose ``(L, D)`` comes from the first row's embedding and mask. Rows with ``latents`` (C, T, h, w)
    floats get the latents column, stamped with ``vae_identity``. Returns ``uri``."""
    import pyarrow.parquet as pq

    from pyoco import storage

    if isinstance(table_or_rows, pa.Table):
        table = table_or_rows
    else:
        rows = list(table_or_rows)
        if not rows:
            raise DataError(f"{uri}: no clip rows to write")
        text_len = len(rows[0][MASK])
        embed_dim = len(np.asarray(rows[0][EMBEDDING]).reshape(-1)) // max(1, text_len)
        latent_shape = None
        if rows[0].get(LATENTS) is not None:
            stacked = np.stack([np.asarray(r[LATENTS], np.float32) for r in rows])
            latent_shape = stacked.shape[1:]
            encoded = latents_array(stacked).to_pylist()
            rows = [{**r, LATENTS: b} for r, b in zip(rows, encoded, strict=True)]
        rows = [
            {
                **r,
                EMBEDDING: np.asarray(r[EMBEDDING], np.float32).reshape(-1).tolist(),
                LABELS: _labels_text(r.get(LABELS)),
            }
            for r in rows
        ]
        schema = clip_schema(text_len, embed_dim, latent_shape=latent_shape, vae_identity=vae_identity)
        table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=1)
    storage.write_bytes(uri, buf.getvalue(), options=storage_options)
    return uri


def _labels_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------------------------- manifest
def read_manifest(data_uri: str, *, storage_options=None) -> dict | None:
    """``DATA/manifest.json`` as a dict; None when there is none (or it is not a JSON object)."""
    from pyoco import storage

    uri = storage.join(data_uri, "manifest.json")
    try:
        obj = json.loads(storage.read_bytes(uri, options=storage_options))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def eval_data_hash(data_uri: str, *, storage_options=None) -> str | None:
    """The manifest's ``eval_data_hash`` (val clip ids + the config that shapes them); None without one.
    Metrics carry it so that the registry never compares numbers computed on different clips."""
    manifest = read_manifest(data_uri, storage_options=storage_options)
    value = (manifest or {}).get("eval_data_hash")
    return str(value) if value else None


# -------------------------------------------------------------------------------------------------- read
def clip_files(data_uri: str, split: str, *, storage_options=None) -> list[str]:
    """The ``DATA/clips/<split>/*.parquet`` files (URIs, sorted); a one-line DataError when there are none."""
    from pyoco import storage

    root = split_uri(data_uri, split)
    try:
        files = sorted(f for f in storage.list_files(root, options=storage_options) if f.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    if not files:
        hint = (
            " (the val split can be empty on tiny data: see manifest.json warnings)" if split == "val" else ""
        )
        raise DataError(
            f"{root}: no clips/{split}/*.parquet files; expected a `pyoco preprocess` output{hint}"
        )
    return files


def read_clips(
    data_uri: str,
    split: str,
    *,
    columns: list[str] | None = None,
    limit: int | None = None,
    storage_options=None,
) -> pa.Table:
    """The clips of one split as one table. With ``limit``, the first ``limit`` clips by ``clip_id`` (so the
    same clips whatever the file layout), sorted by ``clip_id``."""
    import pyarrow.parquet as pq

    from pyoco import storage

    files = clip_files(data_uri, split, storage_options=storage_options)
    if limit is not None:
        ids: list[tuple[str, int]] = []
        for i, f in enumerate(files):
            t = pq.read_table(io.BytesIO(storage.read_bytes(f, options=storage_options)), columns=["clip_id"])
            ids += [(cid, i) for cid in t.column(0).to_pylist()]
        chosen = sorted(ids)[: max(0, limit)]
        wanted: dict[int, set[str]] = {}
        for cid, i in chosen:
            wanted.setdefault(i, set()).add(cid)
        files_to_read = [(files[i], wanted[i]) for i in sorted(wanted)]
    else:
        files_to_read = [(f, None) for f in files]
    cols = None if columns is None else list(dict.fromkeys(["clip_id", *columns]))
    tables = []
    for f, keep in files_to_read:
        t = pq.read_table(io.BytesIO(storage.read_bytes(f, options=storage_options)))
        if cols is not None:
            missing = [c for c in cols if c not in t.column_names]
            if missing:
                raise DataError(f"{f}: missing column(s) {missing}; expected preprocess clip files")
            t = t.select(cols)
        if keep is not None:
            t = t.take([j for j, cid in enumerate(t.column("clip_id").to_pylist()) if cid in keep])
        tables.append(t)
    if not tables:
        schema = pq.read_schema(io.BytesIO(storage.read_bytes(files[0], options=storage_options)))
        table = schema.empty_table() if cols is None else schema.empty_table().select(cols)
    else:
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise DataError(
                f"{split_uri(data_uri, split)}: clip files disagree on their schema: {err}"
            ) from None
    if limit is not None:
        table = table.sort_by("clip_id")
    if columns is not None and "clip_id" not in columns:
        table = table.drop_columns(["clip_id"])
    return table


def frames_array(row_or_bytes: Any, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` from a clip row (dict with frames/num_frames/height/width) or raw bytes."""
    if isinstance(row_or_bytes, dict):
        shape = (int(row_or_bytes["num_frames"]), int(row_or_bytes["height"]), int(row_or_bytes["width"]))
        row_or_bytes = row_or_bytes["frames"]
    if shape is None:
        raise ValueError("frames_array: pass a row or a (T, H, W) shape")
    if row_or_bytes is None:
        raise DataError(NO_FRAMES)
    return np.frombuffer(row_or_bytes, dtype=np.uint8).reshape(*shape, 3)


def embedding_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(B, L, D)`` float32 and ``(B, L)`` bool arrays from a clips table; ``(L, D)`` from the field
    metadata (else L from the mask and D = values / L)."""
    emb_col = table.column(EMBEDDING).combine_chunks()
    mask_col = table.column(MASK).combine_chunks()
    length = mask_col.type.list_size
    shape = embedding_shape(table.schema.field(EMBEDDING))
    emb = np.asarray(emb_col.flatten().to_numpy(zero_copy_only=False), np.float32)
    mask = np.asarray(mask_col.flatten().to_numpy(zero_copy_only=False), bool)
    b = len(table)
    dim = shape[1] if shape is not None else (emb.size // max(1, b * length))
    if emb.size != b * length * dim:
        raise DataError(f"caption_embedding holds {emb.size} values, expected {b} x {length} x {dim}")
    return emb.reshape(b, length, dim), mask.reshape(b, length)


def labels_of(table: pa.Table) -> list[dict]:
    """The parsed ``labels`` of each row (``{}`` for null, or when the table has no ``labels`` column)."""
    if LABELS not in table.column_names:
        return [{} for _ in range(len(table))]
    out = []
    for i, text in enumerate(table.column(LABELS).to_pylist()):
        if text is None:
            out.append({})
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"labels of row {i} is not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise DataError(f"labels of row {i} is a JSON {type(obj).__name__}, expected an object")
        out.append(obj)
    return out
