"""Fixtures for the registry/evaluate tests: a tiny model package and unique registered-model names."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import pytest

TINY_SIZE = 16
TINY_FRAMES = 4
_counter = itertools.count()


def make_tiny_package(out: Path, *, seed: int = 0, noise: str = "progressive", alpha: float = 1.0) -> Path:
    """A video model package small enough for CPU tests: 16x16 pixels, 4 frames, UNet (16, 32)."""
    from pyoco.diffusion import make_scheduler_config
    from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate
    from pyoco.package import PackageInfo, save_package

    unet2d = build_unet2d(TinyUNetConfig(sample_size=TINY_SIZE, block_out_channels=(16, 32)), seed=seed)
    video = VideoDenoiser(inflate(unet2d, seed=seed))
    info = PackageInfo(
        noise={"kind": noise, "alpha": alpha},
        height=TINY_SIZE,
        width=TINY_SIZE,
        num_frames=TINY_FRAMES,
        weights="raw",
        lineage={"data_manifest_hash": f"manifest-{seed}", "git_revision": "0123abcd", "mlflow_run_id": None},
    )
    return save_package(out, video, scheduler_config=make_scheduler_config(None), info=info)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "model", seed=0)


@pytest.fixture()
def model_name() -> str:
    """A fresh registered-model name per test (the MLflow server is shared by the session)."""
    return f"pyoco-test-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture()
def tracking_env(mlflow_server, monkeypatch, tmp_path):
    """Point this process (and CLI subprocesses) at the session's MLflow server, with a private cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("PYOCO_CACHE", str(tmp_path / "cache"))
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    pinned_before = tracking_utils._tracking_uri  # None unless some code called set_tracking_uri
    mlflow.set_tracking_uri(mlflow_server.uri)
    yield mlflow_server
    # set_tracking_uri also writes $MLFLOW_TRACKING_URI; monkeypatch restores the variable after this runs
    mlflow.set_tracking_uri(pinned_before)


def write_eval(path: Path, val_loss: float) -> Path:
    path.write_text(json.dumps({"metrics": {"val_loss": val_loss, "temporal_consistency": 0.1}}))
    return path


def make_clips_dir(
    out: Path,
    *,
    num_clips: int = 6,
    frames: int = TINY_FRAMES,
    size: int = TINY_SIZE,
    text_len: int = 8,
    pooled: bool = False,
    files: int = 2,
    seed: int = 0,
    eval_data_hash: str | None = None,
) -> Path:
    """A preprocess-shaped output folder: clips/val/*.parquet (the held-out split evaluate reads) in the
    pyoco.clips format (labels included; a pooled variant keeps the old columns).

    Frames are a bright square moving one pixel per frame on a dark background (uint8 (T, H, W, 3)
    bytes); ``caption_embedding`` is L*384 float32 (fixed-size list with a shape in the field metadata, as
    preprocess writes it) plus ``caption_mask``, or a pooled (384,) vector without a mask.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    dim = 384
    emb_len = dim if pooled else text_len * dim
    fields = [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("key", pa.string()),
        ("start_frame", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("frames", pa.large_binary()),
        ("caption", pa.string()),
        pa.field(
            "caption_embedding",
            pa.list_(pa.float32(), emb_len),
            metadata={"shape": json.dumps([dim] if pooled else [text_len, dim])},
        ),
    ]
    if not pooled:
        fields.append(("caption_mask", pa.list_(pa.bool_(), text_len)))
    schema = pa.schema(fields)
    if not pooled:
        from pyoco.clips import clip_schema

        schema = clip_schema(text_len, dim)
    rows = []
    for i in range(num_clips):
        video = np.full((frames, size, size, 3), 20, dtype=np.uint8)
        y, x0 = int(rng.integers(0, size - 4)), int(rng.integers(0, size - 4 - frames))
        for t in range(frames):
            video[t, y : y + 4, x0 + t : x0 + t + 4] = (230, 40 * (i % 5), 90)
        row = {
            "clip_id": f"{rng.integers(0, 2**63):016x}",
            "source": f"file:///synthetic/{i}.mp4",
            "key": f"video{i:03d}",
            "start_frame": 0,
            "num_frames": frames,
            "fps": 8.0,
            "height": size,
            "width": size,
            "frames": video.tobytes(),
            "caption": f"a shape number {i} moves right",
            "caption_embedding": rng.standard_normal(emb_len).astype(np.float32).tolist(),
            "clip_index": 0,
            "labels": json.dumps({"shape": "square", "color": "red", "direction": "right"}),
            "node_id": "fixture",
        }
        if not pooled:
            row["caption_mask"] = [j < 3 + i % 4 for j in range(text_len)]
        rows.append(row)
    clips = out / "clips" / "val"
    clips.mkdir(parents=True, exist_ok=True)
    per_file = -(-num_clips // files)
    for f in range(files):
        part = rows[f * per_file : (f + 1) * per_file]
        if part:
            pq.write_table(pa.Table.from_pylist(part, schema=schema), clips / f"part-{f:05d}.parquet")
    if eval_data_hash is not None:  # what preprocess records for these val clips
        (out / "manifest.json").write_text(
            json.dumps({"val_clips": num_clips, "eval_data_hash": eval_data_hash})
        )
    return out


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Tiny models run fastest single-threaded, and OpenMP spin-waiting on a shared 2-core box can make a
    multi-threaded forward 50x slower; restore the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
