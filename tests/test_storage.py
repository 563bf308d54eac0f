"""pyoco.storage against local folders and a real moto S3 server, including a 3 s connection outage."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pyoco import storage, video
from tests.conftest import TEST_AWS_SECRET
from tests.fixtures_data import FlakyProxy, smooth_frames


def test_uri_helpers():
    assert storage.join("s3://b/raw/", "clips", "/x.parquet") == "s3://b/raw/clips/x.parquet"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert (
        storage.is_remote("s3://b/k")
        and not storage.is_remote("/tmp/x")
        and not storage.is_remote("file:///x")
    )
    assert storage.has_glob("s3://b/*.tar") and not storage.has_glob("s3://b/a.tar")


def test_local_files(tmp_path):
    storage.write_bytes(str(tmp_path / "deep" / "er" / "a.tar"), b"abc")
    with storage.open_uri(str(tmp_path / "deep" / "b.txt"), "wb") as f:
        f.write(b"hello")
    assert storage.read_range(str(tmp_path / "deep/er/a.tar"), 1, 3) == b"bc"
    files = storage.list_files(str(tmp_path))
    assert files == [str(tmp_path / "deep/b.txt"), str(tmp_path / "deep/er/a.tar")]
    assert storage.glob_uris(str(tmp_path / "deep" / "**" / "*.tar")) == [str(tmp_path / "deep/er/a.tar")]
    with pytest.raises(FileNotFoundError):
        storage.list_files(str(tmp_path / "missing"))
    with pytest.raises(EOFError):
        storage.read_range(str(tmp_path / "deep/er/a.tar"), 0, 10)  # short reads are errors, not data


def test_credentials_never_in_repr(moto_s3):
    opts = storage.StorageOptions.from_env()
    assert opts.endpoint_url == moto_s3.endpoint_url
    assert opts.secret == TEST_AWS_SECRET
    for text in (repr(opts), str(opts), repr([opts])):
        assert TEST_AWS_SECRET not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_s3_round_trip(moto_s3):
    bucket = moto_s3.make_bucket("storage-test")
    base = f"s3://{bucket}/data"
    storage.write_bytes(storage.join(base, "a/one.tar"), b"0123456789")
    storage.write_bytes(storage.join(base, "b/two.tar"), b"xyz")
    storage.write_bytes(storage.join(base, "b/notes.md"), b"#")
    assert storage.read_bytes(f"{base}/a/one.tar") == b"0123456789"
    assert storage.read_range(f"{base}/a/one.tar", 2, 5) == b"234"
    assert storage.list_files(base, suffixes=(".tar",)) == [f"{base}/a/one.tar", f"{base}/b/two.tar"]
    assert storage.glob_uris(f"{base}/*/*.tar") == [f"{base}/a/one.tar", f"{base}/b/two.tar"]
    # explicit endpoint (config) wins over the environment
    fs, path = storage.filesystem(base, endpoint_url=moto_s3.endpoint_url)
    assert path == f"{bucket}/data" and fs.exists(f"{path}/a/one.tar")
    # video writers take s3:// URIs
    frames = smooth_frames(num_frames=6, height=32, width=32)
    video.write_mp4(frames, f"{base}/v.mp4", fps=8)
    assert video.psnr(video.decode(f"{base}/v.mp4"), frames) > 30


def test_read_survives_a_3s_outage_mid_read(moto_s3):
    bucket = moto_s3.make_bucket("storage-outage")
    payload = np.random.default_rng(0).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes()
    storage.write_bytes(f"s3://{bucket}/big.bin", payload)
    with FlakyProxy(moto_s3.port, trigger_bytes=2**20, outage_s=3.0) as proxy:
        opts = storage.StorageOptions.from_env(proxy.endpoint_url)
        start = time.monotonic()
        got = storage.read_range(f"s3://{bucket}/big.bin", 0, len(payload), options=opts)
        elapsed = time.monotonic() - start
    assert got == payload
    assert proxy.outages == 1 and proxy.dropped >= 1
    assert elapsed >= 2.5, f"the read finished in {elapsed:.1f}s, so it did not span the outage"
