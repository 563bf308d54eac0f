"""Clip shards -> training batches.

Input: the training split of a preprocess output, ``DATA/clips/train/*.parquet`` (local or s3://; format in
:mod:`pyoco.clips`), one row per clip. ``train.data`` may name that folder, ``DATA/clips`` or ``DATA``
(both resolve to ``clips/train``), or any folder of clip parquet files; files of a ``val`` split are never
read (see :func:`list_shards`). Columns read here:

- ``frames``: uint8 (T, H, W, 3), stored as a fixed-shape tensor column (Ray's or Arrow's), a (nested) list, or
  raw bytes (``binary``; then ``num_frames``/``height``/``width`` give the shape);
- ``caption_embedding``: token-level (L, D) float16/float32 states (what `pyoco.text.TextEncoder.encode`
  returns), stored nested or flat (L * D values with ``shape: [L, D]`` field metadata, as preprocess writes
  them), or, failing that, a pooled (D,) vector, used as a single token (L = 1);
- ``caption_mask``: optional (L,) bool/0-1 (True = real token); all ones when absent;
- ``latents`` (when preprocess ran the VAE): float16 (C, T, h, w) bytes, shape and VAE identity in the field
  metadata (`pyoco.clips.latents_info`). Then training reads latents *instead of* frames (no VAE in the loop;
  ``frames`` may be null, ``preprocess.keep_frames: false``).

Output of :func:`collate_clips` (the layout the DeepSpeed engine and `pyoco.diffusion.DiffusionLoss` take)::

    x0        (B, C=3, T, H, W) float32 in [-1, 1]    x0 = uint8 / 127.5 - 1, frames moved to axis 2
              (B, C, T, h, w)   float32 latents       when the clips have a latents column (already scaled)
    cond      (B, L, D)         float32                caption token states
    cond_mask (B, L)            bool                   True = attend

Workers never load the dataset: Ray Data streams each worker's shard through ``iter_torch_batches`` with this
collate and a local shuffle buffer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pyoco.clips import LATENTS, SPLITS, DataError, embedding_shape, latents_info, latents_tensor
from pyoco.config import config_hash

FRAMES = "frames"
EMBEDDING = "caption_embedding"
MASK = "caption_mask"
SHAPE_COLUMNS = ("num_frames", "height", "width")


@dataclass
class ClipGeometry:
    """What the trainer needs to know about the clips before it starts (read from the first shard)."""

    num_frames: int
    height: int
    width: int
    text_len: int  # L (1 for pooled embeddings)
    text_dim: int  # D
    token_level: bool
    has_mask: bool
    frames_binary: bool
    fps: float
    files: list[str]
    num_rows: int
    latent_shape: list[int] | None = None  # (C, T, h, w) of the latents column; None: frames only
    vae_identity: str | None = None  # of the VAE that made the latents

    @property
    def latents(self) -> bool:
        return self.latent_shape is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipGeometry:
        return cls(**d)

    @property
    def columns(self) -> list[str]:
        cols = [LATENTS if self.latents else FRAMES, EMBEDDING]
        if self.has_mask:
            cols.append(MASK)
        return cols


__all__ = ["ClipGeometry", "DataError", "collate_clips", "inspect_clips", "list_shards", "make_collate"]


def _fs(uri: str):
    from pyoco.storage import filesystem

    return filesystem(uri)


def list_shards(uri: str) -> list[str]:
    """The training ``*.parquet`` files under ``uri`` (fs paths, sorted).

    A preprocess output (``DATA`` or ``DATA/clips``, holding ``clips/train`` and ``clips/val``) resolves to
    its ``train`` split. Train never reads val: a ``val`` folder named directly is refused, and files under
    a ``val/`` folder of ``uri`` are left out.
    """
    fs, path = _fs(uri)
    if not fs.exists(path):
        raise DataError(f"{uri}: clips folder not found (run `pyoco preprocess` first or set train.data)")
    path = path.rstrip("/")
    if path.rsplit("/", 1)[-1] == "val" and fs.isdir(path):
        raise DataError(f"{uri}: is a val split; training never reads held-out clips (use clips/train)")
    if fs.isfile(path):
        files = [path] if path.endswith(".parquet") else []
    else:
        for sub in ("clips/train", "train"):
            if fs.isdir(f"{path}/{sub}"):
                path = f"{path}/{sub}"
                break
        files = sorted(
            f for f in fs.find(path) if f.endswith(".parquet") and "/val/" not in f[len(path) :] + "/"
        )
    if not files:
        raise DataError(f"{uri}: no *.parquet clip shards found")
    return files


def inspect_clips(uri: str) -> ClipGeometry:
    """Geometry of the clips under ``uri`` from the first shard's first row and every shard's row count."""
    import pyarrow.parquet as pq

    fs, _ = _fs(uri)
    files = list_shards(uri)
    num_rows = 0
    first = None
    for f in files:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            n = pf.metadata.num_rows
            if first is None and n > 0:
                names = pf.schema_arrow.names
                missing = [c for c in (FRAMES, EMBEDDING) if c not in names]
                if missing:
                    raise DataError(f"{f}: missing column(s) {missing}; expected preprocess clip shards")
                cols = [c for c in (FRAMES, EMBEDDING, MASK, "fps", *SHAPE_COLUMNS) if c in names]
                first = (f, pf.read_row_group(0, columns=cols).slice(0, 1), pf.schema_arrow)
                try:
                    latents = latents_info(pf.schema_arrow)
                except DataError as err:
                    raise DataError(f"{f}: {err}") from None
            num_rows += n
    if first is None:
        raise DataError(f"{uri}: clip shards hold no rows")
    path, table, schema = first
    row = {c: table.column(c).to_pylist()[0] for c in table.column_names}
    frames_type = schema.field(FRAMES).type
    import pyarrow as pa

    binary = pa.types.is_binary(frames_type) or pa.types.is_large_binary(frames_type)
    if latents is not None and row[FRAMES] is None:  # keep_frames: false
        t, h, w = (int(row[c]) for c in SHAPE_COLUMNS)
    elif binary:
        missing = [c for c in SHAPE_COLUMNS if c not in row]
        if missing:
            raise DataError(
                f"{path}: frames are raw bytes but column(s) {missing} giving their shape are missing"
            )
        t, h, w = (int(row[c]) for c in SHAPE_COLUMNS)
        if len(row[FRAMES]) != t * h * w * 3:
            raise DataError(
                f"{path}: frames hold {len(row[FRAMES])} bytes, expected T*H*W*3 = {t * h * w * 3}"
            )
    else:
        arr = _frames_cell(table.column(FRAMES))
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise DataError(f"{path}: frames must be (T, H, W, 3) uint8, got shape {arr.shape}")
        t, h, w = (int(d) for d in arr.shape[:3])
    emb = np.asarray(row[EMBEDDING], dtype=np.float32)
    mask_len = len(row[MASK]) if row.get(MASK) is not None else None
    try:
        shape = embedding_shape(schema.field(EMBEDDING))
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    if shape is not None:  # flat (L * D) list with its shape in the field metadata (pyoco.clips layout)
        if shape[0] * shape[1] != emb.size:
            raise DataError(f"{path}: caption_embedding has {emb.size} values but its metadata says {shape}")
        emb = emb.reshape(shape)
    elif emb.ndim == 1 and mask_len and mask_len > 1 and emb.size % mask_len == 0:
        emb = emb.reshape(mask_len, -1)  # flat (L * D) without metadata: L from the mask
    if emb.ndim == 1:
        token_level, text_len, text_dim = False, 1, int(emb.shape[0])
    elif emb.ndim == 2:
        token_level, text_len, text_dim = True, int(emb.shape[0]), int(emb.shape[1])
    else:
        raise DataError(f"{path}: caption_embedding must be (L, D) or (D,), got shape {emb.shape}")
    return ClipGeometry(
        num_frames=t,
        height=h,
        width=w,
        text_len=text_len,
        text_dim=text_dim,
        token_level=token_level,
        has_mask=MASK in row and token_level,
        frames_binary=binary,
        fps=float(row.get("fps") or 8.0),
        files=files,
        num_rows=num_rows,
        latent_shape=list(latents[0]) if latents is not None else None,
        vae_identity=latents[1] if latents is not None else None,
    )


def _frames_cell(column) -> np.ndarray:
    """First cell of an Arrow frames column as an ndarray, whatever the tensor encoding."""
    import pyarrow as pa

    chunk = column.chunk(0) if hasattr(column, "chunk") else column
    if isinstance(chunk.type, pa.ExtensionType):
        if hasattr(chunk, "to_numpy_ndarray"):  # arrow.fixed_shape_tensor
            return chunk.to_numpy_ndarray()[0]
        return _deep_stack(chunk.to_numpy(zero_copy_only=False)[0], np.uint8)  # Ray's tensor extension
    return np.asarray(chunk.slice(0, 1).to_pylist()[0], dtype=np.uint8)


def _deep_stack(value: Any, dtype) -> np.ndarray:
    """Object arrays of per-row arrays / lists / bytes (what Ray's numpy batches hold for nested lists)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return np.frombuffer(value, dtype=np.uint8).astype(dtype, copy=False)
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.astype(dtype, copy=False)
    if isinstance(value, np.ndarray | list | tuple):
        return np.stack([_deep_stack(v, dtype) for v in value])
    return np.asarray(value, dtype=dtype)


def _arrow_column(col, dtype) -> np.ndarray:
    """An Arrow column (binary, nested lists or a tensor extension) as a (B, ...) ndarray; rows flattened
    when the nesting is lists (callers reshape)."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if isinstance(col.type, pa.ExtensionType):
        if hasattr(col, "to_numpy_ndarray"):  # arrow.fixed_shape_tensor
            return col.to_numpy_ndarray().astype(dtype, copy=False)
        return _deep_stack(col.to_numpy(zero_copy_only=False), dtype)  # Ray's tensor extension
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        off_type = np.int64 if pa.types.is_large_binary(col.type) else np.int32
        offsets = np.frombuffer(col.buffers()[1], dtype=off_type)[col.offset : col.offset + n + 1]
        sizes = np.diff(offsets)
        if n and (sizes != sizes[0]).any():
            raise DataError(f"frames rows have different byte sizes {sorted(set(sizes.tolist()))[:4]}")
        data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return data.reshape(n, -1).astype(dtype, copy=False)
    values = col
    while (
        pa.types.is_list(values.type)
        or pa.types.is_large_list(values.type)
        or pa.types.is_fixed_size_list(values.type)
    ):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def _column(batch: Any, name: str, dtype) -> np.ndarray:
    if hasattr(batch, "column_names"):  # pyarrow.Table (Ray's ArrowBatchCollateFn)
        return _arrow_column(batch.column(name), dtype)
    return _deep_stack(batch[name], dtype)


def _has(batch: Any, name: str) -> bool:
    return name in (batch.column_names if hasattr(batch, "column_names") else batch)


def collate_clips(batch: Any, geometry: ClipGeometry) -> dict[str, torch.Tensor]:
    """A batch (pyarrow Table or dict of numpy arrays) -> ``{"x0", "cond", "cond_mask"}`` tensors (layouts in
    the module docstring)."""
    g = geometry
    if g.latents:
        raw = batch.column(LATENTS) if hasattr(batch, "column_names") else list(batch[LATENTS])
        x0 = latents_tensor(raw, tuple(g.latent_shape))
        return {"x0": x0.contiguous(), **_text_batch(batch, g, x0.shape[0])}
    frames = _column(batch, FRAMES, np.uint8)
    b = frames.shape[0]
    if frames.size != b * g.num_frames * g.height * g.width * 3:
        raise DataError(
            f"frames batch holds {frames.size // max(1, b)} values per clip, expected "
            f"{g.num_frames}x{g.height}x{g.width}x3 like the first shard"
        )
    frames = frames.reshape(b, g.num_frames, g.height, g.width, 3)
    # Arrow buffers are read-only: copy once (uint8, small) instead of handing torch a read-only array.
    x0 = torch.from_numpy(np.array(frames, copy=True)).permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)
    return {"x0": x0.contiguous(), **_text_batch(batch, g, b)}


def _text_batch(batch: Any, g: ClipGeometry, b: int) -> dict[str, torch.Tensor]:
    """``{"cond", "cond_mask"}`` of a batch of ``b`` clips."""
    emb = _column(batch, EMBEDDING, np.float32)
    if emb.size != b * g.text_len * g.text_dim:
        raise DataError(
            f"caption_embedding batch holds {emb.size // max(1, b)} values per clip, expected "
            f"{g.text_len}x{g.text_dim} like the first shard (mixed text encoders in one dataset?)"
        )
    cond = torch.from_numpy(np.array(emb.reshape(b, g.text_len, g.text_dim), dtype=np.float32, copy=True))
    if g.has_mask and _has(batch, MASK):
        mask = torch.from_numpy(_column(batch, MASK, np.uint8).reshape(b, g.text_len) != 0)
    else:
        mask = torch.ones((b, g.text_len), dtype=torch.bool)
    return {"cond": cond, "cond_mask": mask}


def make_collate(geometry: ClipGeometry):
    """The collate for ``iter_torch_batches``: Ray hands it Arrow tables (no per-row Python objects)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class ClipCollate(ArrowBatchCollateFn):
        def __call__(self, batch):
            return collate_clips(batch, geometry)

    return ClipCollate()


# Manifest fields that change on every preprocess run without the data changing.
VOLATILE_MANIFEST_FIELDS = ("created_at", "elapsed_s", "decode_nodes", "pyoco_version")


def manifest_data_hash(manifest: dict) -> str:
    """The data's identity: the manifest's own ``data_hash`` (same inputs + config = same hash, whatever the
    cluster or the time), else a hash of the manifest without its volatile fields."""
    if manifest.get("data_hash"):
        return str(manifest["data_hash"])
    return config_hash({k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_FIELDS})


def manifest_hash(clips_uri: str) -> str | None:
    """The data hash (:func:`manifest_data_hash`) of the preprocess ``manifest.json`` next to ``clips/``
    (None when there is none). The same value the workflow and the registry record as the data hash."""
    from pyoco.storage import join

    def up(uri: str) -> str:
        return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."

    parent = up(clips_uri)
    candidates = [join(clips_uri, "manifest.json"), join(parent, "manifest.json")]
    if clips_uri.rstrip("/").rsplit("/", 1)[-1] in SPLITS:  # DATA/clips/train -> DATA/manifest.json
        candidates.append(join(up(parent), "manifest.json"))
    for candidate in candidates:
        fs, path = _fs(candidate)
        try:
            if fs.exists(path):
                with fs.open(path, "r") as f:
                    return manifest_data_hash(json.load(f))
        except (OSError, json.JSONDecodeError):
            return None
    return None
