"""Shot-aware clips and motion in preprocess, against the synth ground truth: clips of *cut* videos never
span the cut, *static* videos are rejected as ``static``, every clip row carries its motion score, and the
manifest still accounts for every input."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from pipelines.preprocess.step import run_preprocess
from pyoco import shots, synth, video
from pyoco.config import PreprocessConfig


def test_plan_shot_clips_never_spans_a_cut():
    rng = random.Random(0)
    for trial in range(300):
        total = rng.randint(8, 120)
        cuts = sorted(rng.sample(range(1, total), rng.randint(0, min(5, total - 1))))
        num_frames, stride = rng.randint(2, 8), rng.choice([1, 2, 1.5])
        try:
            clips = video.plan_shot_clips(
                total, 8.0, cuts, num_frames=num_frames, frame_stride=int(stride) if stride >= 1 else 1,
                max_clips=rng.randint(1, 4), seed=trial, key=str(trial),
            )  # fmt: skip
        except video.VideoDecodeError as err:
            span = shots.clip_span(num_frames, int(stride))
            assert err.reason in ("too_short", "shots_too_short")
            assert all(b - a < span for a, b in shots.shot_ranges(total, cuts))
            continue
        starts = [c.start_frame for c in clips]
        assert starts == sorted(set(starts))
        for c in clips:
            assert c.frame_indices[-1] < total
            assert not any(c.frame_indices[0] < cut <= c.frame_indices[-1] for cut in cuts), (cuts, c)
        for a, b in zip(clips, clips[1:], strict=False):
            assert a.frame_indices[-1] < b.start_frame  # no overlap


@pytest.fixture(scope="module")
def shots_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("shots")
    raw, out = root / "raw", root / "out"
    synth.write_dataset(
        str(raw), videos=24, shards=2, seed=5, frames=32, size=40, cut_fraction=0.4, static_fraction=0.25
    )
    truth = {}
    import tarfile

    for shard in sorted(raw.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    truth[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())
    cfg = PreprocessConfig(
        input=str(raw),
        output=str(out),
        num_frames=6,
        frame_stride=2,
        size=32,
        max_clips_per_video=2,
        val_fraction=0.0,
        max_reject_fraction=0.9,
        captions={"dedupe": "none"},
    )
    manifest = run_preprocess(cfg, progress=False)
    clips = [r for f in sorted((out / "clips").glob("*/*.parquet")) for r in pq.read_table(f).to_pylist()]
    rejects = [r for f in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return truth, manifest, clips, rejects


def test_cut_videos_never_yield_a_spanning_clip(shots_run):
    truth, manifest, clips, _ = shots_run
    cut_keys = {k for k, t in truth.items() if t.get("kind") == "cut"}
    assert len(cut_keys) >= 5
    span = shots.clip_span(6, 2)
    seen = set()
    for c in clips:
        cuts = truth[c["key"]].get("cut_frames", [])
        assert not any(c["start_frame"] < cut < c["start_frame"] + span for cut in cuts), (c["key"], cuts)
        seen.add(c["key"])
    assert cut_keys & seen, "the cut videos' clean shots should still give clips"


def test_static_videos_are_rejected_as_static(shots_run):
    truth, manifest, clips, rejects = shots_run
    static = {k for k, t in truth.items() if t.get("kind") == "static"}
    assert len(static) >= 3
    rejected_static = {r["key"] for r in rejects if r["reason"] == "static"}
    assert rejected_static == static
    assert all(r["stage"] == "motion" for r in rejects if r["reason"] == "static")
    assert manifest["rejected"].get("static") == len(static)
    assert manifest["inputs"] == manifest["accepted_videos"] + sum(manifest["rejected"].values())
    assert manifest["clips_dropped"] == {}  # a moving video's clips all move
    assert all(c["motion"] is not None and c["motion"] >= shots.STATIC_MOTION for c in clips)
    assert {c["key"] for c in clips}.isdisjoint(static)
