"""pyoco.synth and ``pyoco data synth``: deterministic shards whose ground truth matches the pixels."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from pyoco import synth, video


def _centroids(frames: np.ndarray, rgb) -> np.ndarray:
    """(T, 2) centroid (x, y) of the pixels within 60 of the shape colour, in pixel-centre coordinates."""
    dist = np.abs(frames.astype(np.int16) - np.array(rgb, np.int16)).max(-1)
    out = []
    for m in dist < 60:
        ys, xs = np.nonzero(m)
        assert len(xs) > 0, "shape not visible"
        out.append((xs.mean() + 0.5, ys.mean() + 0.5))
    return np.array(out)


@pytest.mark.parametrize("index", range(12))
def test_ground_truth_matches_pixels(index):
    spec = synth.make_spec(index, seed=3, frames=16, size=64, fps=8)
    frames = synth.render(spec)
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    c = _centroids(frames, synth.COLORS[spec.color])
    dx, dy = synth.DIRECTIONS[spec.direction]
    step = np.diff(c, axis=0).mean(0)
    # moves by speed_px_per_frame along the stated direction (rasterisation: within 0.15 px/frame)
    np.testing.assert_allclose(step, np.array([dx, dy]) * spec.speed_px_per_frame, atol=0.15)
    if spec.shape != "triangle":  # symmetric shapes: centroid == stated centre
        np.testing.assert_allclose(c[0], spec.start_xy, atol=0.6)
        np.testing.assert_allclose(c[-1], spec.end_xy, atol=0.6)
    # the shape never touches the border, so the direction is always visible
    dist = np.abs(frames.astype(np.int16) - np.array(synth.COLORS[spec.color], np.int16)).max(-1) < 60
    assert not dist[:, 0, :].any() and not dist[:, -1, :].any()
    assert not dist[:, :, 0].any() and not dist[:, :, -1].any()
    # the caption says what the json says
    cap = spec.caption
    assert spec.color in cap and spec.shape in cap and spec.direction in cap
    assert spec.attributes()["speed"] in ("slow", "fast")


def test_decoded_video_keeps_the_motion():
    spec = synth.make_spec(5, seed=0, frames=12, size=64, fps=8)
    sample = synth.encode_sample(spec)
    decoded = video.decode(sample["mp4"])
    assert decoded.shape == (12, 64, 64, 3)
    truth = _centroids(synth.render(spec), synth.COLORS[spec.color])
    got = _centroids(decoded, synth.COLORS[spec.color])
    np.testing.assert_allclose(got, truth, atol=1.0)
    attrs = json.loads(sample["json"])
    assert attrs["shape"] == spec.shape and attrs["direction"] == spec.direction
    assert sample["txt"].decode() == spec.caption == attrs["caption"]


def test_attribute_coverage_and_caption_variety():
    specs = [synth.make_spec(i, seed=0, frames=8, size=32) for i in range(200)]
    assert {s.shape for s in specs} == set(synth.SHAPES)
    assert {s.color for s in specs} == set(synth.COLORS)
    assert {s.direction for s in specs} == set(synth.DIRECTIONS)
    assert {s.speed for s in specs} == set(synth.SPEEDS)
    assert {s.background for s in specs} == set(synth.BACKGROUNDS)
    assert len({s.caption for s in specs}) > 100


def test_shards_are_deterministic(tmp_path):
    a = [
        (n, hashlib.sha256(d).hexdigest())
        for n, _, d in synth.iter_shards(videos=6, shards=2, seed=1, frames=6, size=32)
    ]
    b = [
        (n, hashlib.sha256(d).hexdigest())
        for n, _, d in synth.iter_shards(videos=6, shards=2, seed=1, frames=6, size=32)
    ]
    c = [
        (n, hashlib.sha256(d).hexdigest())
        for n, _, d in synth.iter_shards(videos=6, shards=2, seed=2, frames=6, size=32)
    ]
    assert a == b
    assert a != c


def test_cli_writes_webdataset_shards(tmp_path):
    from pipelines.cli import app

    out = tmp_path / "raw"
    res = CliRunner().invoke(
        app,
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--videos",
            "7",
            "--shards",
            "3",
            "--frames",
            "6",
            "--size",
            "32",
        ],
    )
    assert res.exit_code == 0, res.output
    shards = sorted(p.name for p in out.iterdir() if p.name != synth.SYNTH_MARKER)
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((out / synth.SYNTH_MARKER).read_text()) == {"shards": shards}
    keys = []
    for name in shards:
        with tarfile.open(out / name) as tar:
            names = tar.getnames()
            assert len(names) % 3 == 0
            for m in tar.getmembers():
                assert m.mtime == 0 and m.uid == 0
            for n in names:
                if n.endswith(".json"):
                    attrs = json.load(io.BytesIO(tar.extractfile(n).read()))
                    keys.append(attrs["key"])
                    assert n == f"{attrs['key']}.json" and f"{attrs['key']}.mp4" in names
    assert keys == [f"{i:08d}" for i in range(7)]


def test_cli_rejects_bad_flags(tmp_path):
    from pipelines.cli import app

    res = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--videos", "0"])
    assert res.exit_code == 2


def test_smaller_rerun_leaves_no_stale_shards_for_preprocess(tmp_path):
    """Issue 12: a rerun with fewer shards used to leave the earlier run's extra shards, which preprocess
    then ingested. Only this run's shards remain, and preprocess's discovery sees exactly those."""
    from pipelines.preprocess.discover import StepSettings, discover_inputs
    from pyoco.config import PreprocessConfig

    out = tmp_path / "raw"
    synth.write_dataset(str(out), videos=8, shards=4, frames=6, size=32)
    assert len(list(out.glob("shard-*.tar"))) == 4
    summary = synth.write_dataset(str(out), videos=4, shards=2, frames=6, size=32)
    assert summary["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == summary["shards"]
    settings = StepSettings.from_config(PreprocessConfig(input=str(out), output=str(tmp_path / "o")))
    plan = discover_inputs(str(out), "auto", settings, None)
    assert [p.rsplit("/", 1)[-1] for p in plan.shards] == summary["shards"]


def test_refuses_a_folder_it_did_not_write(tmp_path):
    from pipelines.cli import app

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--videos", "2", "--shards", "1"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a `pyoco data synth` output" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a synth output with a foreign file added later is refused too, and nothing is deleted
    raw = tmp_path / "raw"
    synth.write_dataset(str(raw), videos=2, shards=1, frames=6, size=32)
    (raw / "extra.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match="did not write"):
        synth.write_dataset(str(raw), videos=2, shards=1, frames=6, size=32)
    assert (raw / "extra.tar").exists() and (raw / "shard-000000.tar").exists()
