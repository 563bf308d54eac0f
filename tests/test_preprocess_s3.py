"""Against a real moto S3 server: ``pyoco data synth`` → s3://, ``pyoco preprocess`` s3:// → s3://, and the
same job through a proxy that drops every connection for 3 s mid-read."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.preprocess.step import run_preprocess
from pyoco import storage, synth
from pyoco.clips import embedding_arrays, frames_array
from pyoco.config import PreprocessConfig
from tests.conftest import TEST_AWS_SECRET
from tests.fixtures_data import FlakyProxy

BUCKET = "pyoco-data"
VIDEOS, SHARDS, FRAMES, SIZE = 64, 4, 12, 32


def _read_table(prefix: str):
    fs, path = storage.filesystem(prefix)
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))  # clips/{train,val}/ too
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f))) for f in files]), files


@pytest.fixture(scope="module")
def s3_run(moto_s3, ray_local):
    from pipelines.cli import app

    moto_s3.make_bucket(BUCKET)
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["data", "synth", "--out", f"s3://{BUCKET}/raw", "--videos", str(VIDEOS), "--shards", str(SHARDS)]
        + ["--frames", str(FRAMES), "--size", str(SIZE)],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        ["preprocess", "--input", f"s3://{BUCKET}/raw", "--output", f"s3://{BUCKET}/clips", "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    assert TEST_AWS_SECRET not in res.output
    manifest = json.loads(storage.read_bytes(f"s3://{BUCKET}/clips/manifest.json"))
    return manifest, res.output


def test_s3_schema_counts_and_manifest(s3_run):
    manifest, output = s3_run
    assert "invariant holds" in output
    specs = [synth.make_spec(i, seed=0, frames=FRAMES, size=SIZE, fps=8) for i in range(VIDEOS)]
    n_unique = len({" ".join(s.caption.lower().split()) for s in specs})  # duplicate captions are rejected
    assert manifest["inputs"] == VIDEOS
    assert manifest["accepted_videos"] == n_unique
    assert manifest["rejected"] == ({"duplicate_caption": VIDEOS - n_unique} if n_unique < VIDEOS else {})
    assert manifest["inputs"] == manifest["accepted_videos"] + sum(manifest["rejected"].values())
    cfg = PreprocessConfig(input="x", output="y")
    assert manifest["clips_written"] == n_unique * cfg.max_clips_per_video
    assert manifest["format"] == "webdataset" and manifest["config_hash"] and manifest["pyoco_version"]
    assert TEST_AWS_SECRET not in json.dumps(manifest)

    table, files = _read_table(f"s3://{BUCKET}/clips/clips")
    assert ["/".join(f.rsplit("/", 2)[-2:]) for f in files] == manifest["clip_files"]
    assert table.num_rows == manifest["clips_written"]
    types = {f.name: str(f.type) for f in table.schema}
    assert types["frames"] == "large_binary" and types["clip_id"] == "string" and types["fps"] == "float"
    assert types["num_frames"] == types["height"] == types["width"] == types["start_frame"] == "int32"
    rows = table.slice(0, 3).to_pylist()
    for row in rows:
        assert frames_array(row).shape == (cfg.num_frames, cfg.size, cfg.size, 3)
        assert row["source"].startswith(f"s3://{BUCKET}/raw/shard-")
    emb, mask = embedding_arrays(table)
    assert emb.shape == (table.num_rows, cfg.text_max_length, 384) and emb.dtype == np.float32
    assert mask.any(1).all() and (np.abs(emb[mask]).sum(-1) > 0).all()

    rejects, _ = _read_table(f"s3://{BUCKET}/clips/rejects")
    assert rejects.schema.names == ["source", "key", "stage", "reason", "detail"]
    assert rejects.num_rows == sum(manifest["rejected"].values())


def test_s3_outage_mid_read_same_counts(s3_run, moto_s3):
    """Every connection to S3 drops for 3 s while clips are being read; the job completes identically."""
    manifest, _ = s3_run
    fs, path = storage.filesystem(f"s3://{BUCKET}/raw")
    shard_bytes = sum(fs.size(p) for p in fs.find(path))
    # The index pass reads each shard once (~shard_bytes); the outage starts once the decode pass has
    # read about a fifth of the video bytes again.
    with FlakyProxy(moto_s3.port, trigger_bytes=int(shard_bytes * 1.2), outage_s=3.0) as proxy:
        cfg = PreprocessConfig(
            input=f"s3://{BUCKET}/raw",
            output=f"s3://{BUCKET}/clips-outage",
            s3_endpoint_url=proxy.endpoint_url,
        )
        disturbed = run_preprocess(cfg, progress=False)
    assert proxy.outages == 1, f"the outage never started ({proxy.bytes_from_target} bytes relayed)"
    assert proxy.dropped + proxy.refused >= 1
    for key in ("inputs", "accepted_videos", "clips_written", "rejected"):
        assert disturbed[key] == manifest[key], key
    assert disturbed["clip_files"] and len(disturbed["data_hash"]) == 16
    a, _ = _read_table(f"s3://{BUCKET}/clips/clips")
    b, _ = _read_table(f"s3://{BUCKET}/clips-outage/clips")
    cols = [c for c in a.schema.names if c != "node_id"]
    assert a.select(cols).sort_by("clip_id").equals(b.select(cols).sort_by("clip_id"))


def test_s3_failed_rerun_keeps_the_previous_outputs(s3_run):
    """Issue 12: a rerun that fails (here: every input rejected, past max_reject_fraction) leaves the
    previous run's clips, rejects and manifest on S3 untouched; its own outputs stay under .staging/."""
    from pipelines.common import PyocoError

    fs, root = storage.filesystem(f"s3://{BUCKET}/clips")
    fs.invalidate_cache()
    before = {p: fs.info(p)["ETag"] for p in fs.find(root)}
    assert f"{root}/manifest.json" in before and any("/clips/clips/" in p for p in before)
    storage.write_bytes(f"s3://{BUCKET}/junk/shard-000000.tar", b"not a tar at all")
    with pytest.raises(PyocoError, match=r"1 of 1 inputs rejected .*not_a_tar 1"):
        run_preprocess(
            PreprocessConfig(input=f"s3://{BUCKET}/junk", output=f"s3://{BUCKET}/clips"), progress=False
        )
    fs.invalidate_cache()
    after = {p: fs.info(p)["ETag"] for p in fs.find(root) if "/.staging/" not in p}
    assert after == before
    staged = json.loads(storage.read_bytes(f"s3://{BUCKET}/clips/.staging/manifest.incomplete.json"))
    assert staged["rejected"] == {"not_a_tar": 1}
