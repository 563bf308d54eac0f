"""Preprocess failure modes (issue 12): a decode worker that dies, MemoryError, permanent storage errors,
the reject-rate limit, and a failed rerun that must leave the previous good outputs in place."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.common import PyocoError
from pipelines.preprocess.discover import StepSettings
from pipelines.preprocess.stages import decode_row
from pipelines.preprocess.step import run_preprocess
from pyoco import synth
from pyoco.config import PreprocessConfig
from tests.fixtures_data import build_bad_corpus, shape_video

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(input: str, output: str, **kw) -> PreprocessConfig:
    base = dict(input=input, output=output, num_frames=8, size=32, rows_per_file=5, videos_per_task=2)
    base.update(kw)
    return PreprocessConfig(**base)


def rejects_of(out: Path) -> list[dict]:
    return [r for f in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "shards"
    synth.write_dataset(str(path), videos=6, shards=1, seed=3, frames=12, size=32, fps=8)
    return path


def test_a_video_that_kills_its_decode_worker_is_a_decode_crash(ray_local, raw, tmp_path, monkeypatch):
    """The decode task really dies (os._exit(1) in the worker) on one named video: its batch is retried
    one video per task, that video is recorded as decode_crash, its batch partner keeps its clip, and
    inputs == accepted + rejected still holds."""
    victim = "00000002"
    monkeypatch.setenv("PYOCO_TEST_CRASH_ON_KEY", victim)
    out = tmp_path / "out"
    manifest = run_preprocess(tiny_cfg(str(raw), str(out)), progress=False)
    assert manifest["inputs"] == 6
    assert manifest["rejected"] == {"decode_crash": 1}
    assert manifest["accepted_videos"] == 5
    assert manifest["inputs"] == manifest["accepted_videos"] + sum(manifest["rejected"].values())
    (row,) = rejects_of(out)
    assert (row["key"], row["stage"], row["reason"]) == (victim, "decode", "decode_crash")
    assert "died" in row["detail"]
    clips = pq.read_table(out / "clips").column("key").to_pylist()
    assert sorted(clips) == [f"{i:08d}" for i in range(6) if i != 2]


def test_memory_error_propagates_instead_of_becoming_a_reject(tmp_path):
    """A real MemoryError (address space capped with RLIMIT_AS, then a 4096 px decode) fails the call."""
    video = tmp_path / "v.mp4"
    video.write_bytes(shape_video(1, frames=12, size=32))
    script = f"""
import resource
from pipelines.preprocess.discover import StepSettings
from pipelines.preprocess.stages import decode_row
from pyoco.config import PreprocessConfig
settings = StepSettings.from_config(PreprocessConfig(input="x", output="y", num_frames=8, size=4096))
row = {{"source": {str(video)!r}, "key": "v", "caption": "a", "video_uri": {str(video)!r}, "offset": -1, "size": -1}}
kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
limit = (kb + 300_000) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    out = decode_row(row, settings, None)
except MemoryError:
    print("MemoryError")
else:
    print("returned", out[0]["reason"])
"""
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.stdout.strip() == "MemoryError", res.stdout + res.stderr


def _row(uri: str, offset: int = -1, size: int = -1) -> dict:
    return {"source": uri, "key": "k", "caption": "a", "video_uri": uri, "offset": offset, "size": size}


def test_permanent_read_errors_are_rejects_with_a_reason_at_once(tmp_path, moto_s3):
    settings = StepSettings.from_config(tiny_cfg("x", "y"))
    folder = tmp_path / "not-a-file.mp4"
    folder.mkdir()
    (out,) = decode_row(_row(str(folder)), settings, None)
    assert (out["stage"], out["reason"]) == ("read", "storage_error") and "IsADirectoryError" in out["detail"]

    from pyoco import storage

    bucket = moto_s3.make_bucket("pyoco-permanent")
    uri = f"s3://{bucket}/small.tar"
    storage.write_bytes(uri, b"0123456789")
    start = time.monotonic()
    (out,) = decode_row(_row(uri, offset=100, size=50), settings, storage.StorageOptions.from_env())
    assert time.monotonic() - start < 10, "a permanent S3 error (InvalidRange) was retried"
    assert (out["stage"], out["reason"]) == ("read", "storage_error") and "range" in out["detail"].lower()
    (out,) = decode_row(_row(f"s3://{bucket}/gone.mp4"), settings, storage.StorageOptions.from_env())
    assert out["reason"] == "read_error"


def test_reject_limit_fails_and_a_failed_rerun_keeps_the_previous_outputs(ray_local, raw, tmp_path):
    out = tmp_path / "out"
    good = run_preprocess(tiny_cfg(str(raw), str(out)), progress=False)
    assert good["accepted_videos"] == 6
    before = snapshot(out)
    assert "manifest.json" in before and any(k.startswith("clips/") for k in before)

    # Rerun into the same output on a corpus that rejects 16 of 22 inputs (73 % > the default 50 %).
    bad = tmp_path / "bad"
    expected = build_bad_corpus(bad)
    with pytest.raises(PyocoError) as info:
        run_preprocess(tiny_cfg(str(bad), str(out)), progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "16 of 22 inputs rejected" in msg and "max_reject_fraction 0.5" in msg
    assert "decode_error 2" in msg and "unsafe_path 2" in msg  # the top reasons, with counts
    assert sum(v != "accepted" for v in expected.values()) == 16
    after = {k: v for k, v in snapshot(out).items() if not k.startswith(".staging/")}
    assert after == before  # the previous good outputs, byte for byte
    staged = json.loads((out / ".staging" / "manifest.incomplete.json").read_text())
    assert staged["inputs"] == 22 and staged["accepted_videos"] == 6

    # The same corpus with a looser limit succeeds and replaces the outputs, leaving nothing staged.
    m = run_preprocess(tiny_cfg(str(bad), str(out), max_reject_fraction=0.8), progress=False)
    assert m["inputs"] == 22 and json.loads((out / "manifest.json").read_text())["inputs"] == 22
    assert sorted(p.name for p in out.iterdir()) == ["clips", "manifest.json", "rejects"]
    assert len(rejects_of(out)) == 16
