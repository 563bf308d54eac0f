"""Shot cuts, cut-free clip windows, motion and jitter (pyoco.shots), against synth ground truth."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from pyoco import shots, synth, video

KINDS = {"cut_fraction": 0.4, "static_fraction": 0.3}


def _decoded(spec: synth.ShapeSpec) -> np.ndarray:
    """The video as preprocess sees it: H.264-encoded by synth, decoded by PyAV."""
    return video.decode(synth.encode_sample(spec)["mp4"])


@pytest.fixture(scope="module")
def videos() -> list[tuple[synth.ShapeSpec, np.ndarray]]:
    specs = [synth.make_spec(i, seed=5, frames=32, size=64, **KINDS) for i in range(36)]
    return [(s, _decoded(s)) for s in specs]


def test_the_mix_has_every_kind(videos):
    kinds = [s.kind for s, _ in videos]
    assert {k: kinds.count(k) for k in synth.KINDS} == {"normal": 16, "cut": 13, "static": 7}


def test_cuts_are_found_frame_exact_and_normal_videos_have_none(videos):
    for spec, frames in videos:
        truth = [spec.cut_frame] if spec.kind == "cut" else []
        assert shots.detect_cuts(frames) == truth, (spec.index, spec.kind)


def test_cut_scores_separate_cuts_from_motion(videos):
    """Margins, so the default thresholds are not tuned to the edge: motion < 0.1, a cut > 0.35."""
    for spec, frames in videos:
        s = shots.cut_scores(frames)
        assert s.shape == (len(frames) - 1,)
        if spec.kind == "cut":
            assert s[spec.cut_frame - 1] > 0.35
            s = np.delete(s, spec.cut_frame - 1)
        assert s.max() < 0.1, spec.index


@pytest.mark.parametrize("size", [32, 64])
def test_static_videos_score_no_motion_and_moving_ones_do(size):
    """Through the codec, at clip-like sizes and every 2nd frame; margins of 4x on both sides."""
    for i in range(24):
        spec = synth.make_spec(i, seed=9, frames=32, size=size, static_fraction=0.5)
        m = shots.motion_score(_decoded(spec)[::2])
        if spec.kind == "static":
            assert m < shots.STATIC_MOTION / 4, spec.index  # codec noise only, below the noise floor
        else:
            assert m > 4 * shots.STATIC_MOTION, spec.index  # slow shapes: 0.35 of the top speed


def test_clip_windows_never_span_a_cut(videos):
    for spec, frames in videos:
        cuts = shots.detect_cuts(frames)
        for a, b in shots.clip_windows(len(frames), cuts, clip_len=8, stride=2):
            assert b - a == 15 and 0 <= a and b <= len(frames)
            assert not any(a < c < b for c in cuts)
            if spec.kind == "cut":  # and really lies inside one shot: no scene change within it
                assert shots.detect_cuts(frames[a:b]) == []


def test_motion_score_formula():
    x = np.zeros((3, 2, 2, 3), np.uint8)
    x[1, 0, 0, 0] = 255  # one channel of one pixel flashes on and off again: 2 changes of 255
    x[1, 1, 1, 1] = 6  # and one changes by the noise floor only: not motion
    assert shots.motion_score(x) == pytest.approx(2 * 255 / (2 * 2 * 2 * 3) / 255)
    assert shots.motion_score(x, noise_floor=0) == pytest.approx((2 * 255 + 2 * 6) / (2 * 2 * 2 * 3) / 255)
    assert shots.motion_score(x[:1]) == 0.0


def test_clip_windows_tile_each_shot():
    assert shots.shot_ranges(20, [5, 12]) == [(0, 5), (5, 12), (12, 20)]
    assert shots.clip_windows(20, [5, 12], clip_len=3, stride=1) == [
        (0, 3),
        (5, 8),
        (8, 11),
        (12, 15),
        (15, 18),
    ]
    assert shots.clip_windows(20, [], clip_len=4, stride=2) == [(0, 7), (7, 14)]  # span (4-1)*2+1
    assert shots.clip_windows(6, [3], clip_len=4) == []  # both shots are shorter than a clip
    # fractional steps, as with a target fps: round(15 * 1.5) + 1, rounded half to even like plan_clips
    assert (
        shots.clip_span(16, 1.5)
        == 23
        == video.plan_clips(23, 30.0, num_frames=16, target_fps=20)[0].frame_indices[-1] + 1
    )


def test_clip_windows_random_cuts():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 80)
        cuts = sorted(rng.sample(range(1, max(2, n)), k=min(n - 1, rng.randint(0, 5)))) if n > 1 else []
        clip_len, stride = rng.randint(1, 8), rng.choice([1, 2, 1.5])
        wins = shots.clip_windows(n, cuts, clip_len, stride)
        span = shots.clip_span(clip_len, stride)
        for a, b in wins:
            assert b - a == span and 0 <= a < b <= n and not any(a < c < b for c in cuts)
        assert all(nxt[0] >= prev[1] for prev, nxt in zip(wins, wins[1:], strict=False))  # no overlap
        # and none is missed: each shot holds floor(len / span) windows
        assert len(wins) == sum((b - a) // span for a, b in shots.shot_ranges(n, cuts))


def _panned(shifts: list[tuple[int, int]], size: int = 48) -> np.ndarray:
    """A textured frame translated (circularly) by the running sum of ``shifts``: a camera path."""
    tex = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pos = np.cumsum([(0, 0), *shifts], axis=0)
    return np.stack([np.roll(tex, (int(dy), int(dx)), axis=(0, 1)) for dx, dy in pos])


def test_global_shifts_recover_the_camera_path():
    shifts = [(2, -1), (3, 0), (-4, 5), (0, 0), (1, 1)]
    np.testing.assert_array_equal(shots.global_shifts(_panned(shifts)), np.array(shifts))


def test_jitter_is_zero_for_a_steady_pan_and_large_for_shake():
    assert shots.jitter_score(_panned([(2, 1)] * 10)) == 0.0
    rng = np.random.default_rng(1)
    shake = [tuple(int(v) for v in rng.integers(-4, 5, 2)) for _ in range(12)]
    expected = float(np.sqrt((np.diff(np.array(shake, float), axis=0) ** 2).sum(1).mean()))
    assert shots.jitter_score(_panned(shake)) == pytest.approx(expected)
    assert expected > shots.JITTER_PX


def test_synth_normal_videos_are_unchanged_by_the_kind_options():
    """Adding cut/static videos to a dataset never changes the normal ones (their own draw stream)."""
    for i in range(40):
        mixed = synth.make_spec(i, seed=2, **KINDS)
        if mixed.kind == "normal":
            assert mixed == synth.make_spec(i, seed=2)
        else:  # the first shot is the normal video's, up to speed/caption for a static one
            plain = synth.make_spec(i, seed=2)
            assert (mixed.shape, mixed.color, mixed.start_xy) == (plain.shape, plain.color, plain.start_xy)


def test_synth_cut_ground_truth():
    spec = next(s for i in range(20) if (s := synth.make_spec(i, seed=0, frames=24, **KINDS)).kind == "cut")
    second = spec.second_shot
    assert 6 <= spec.cut_frame <= 18 and second.frames == 24 - spec.cut_frame
    assert second.shape != spec.shape and second.color != spec.color
    assert second.background_rgb != spec.background_rgb
    frames = synth.render(spec)
    assert frames.shape == (24, 64, 64, 3)
    attrs = spec.attributes()
    assert attrs["kind"] == "cut" and attrs["cut_frames"] == [spec.cut_frame]
    assert attrs["second_shot"]["color"] == second.color
    # the frames after the cut are the second shot's, rendered from its own frame 0
    assert synth.score_video(frames[spec.cut_frame :]).color == second.color
    assert synth.score_video(frames[: spec.cut_frame]).color == spec.color


def test_synth_static_ground_truth():
    spec = next(s for i in range(20) if (s := synth.make_spec(i, seed=0, **KINDS)).kind == "static")
    frames = synth.render(spec)
    assert (frames == frames[:1]).all()
    attrs = spec.attributes()
    assert attrs["kind"] == "static" and attrs["direction"] is None and attrs["speed_px_per_frame"] == 0.0
    assert "still" in spec.caption or "not move" in spec.caption


def test_cli_writes_cut_and_static_videos(tmp_path):
    from pipelines.cli import app

    out = tmp_path / "raw"
    args = ["data", "synth", "--out", str(out), "--videos", "10", "--shards", "1", "--frames", "16"]
    res = CliRunner().invoke(
        app, [*args, "--size", "32", "--cut-fraction", "0.5", "--static-fraction", "0.3"]
    )
    assert res.exit_code == 0, res.output
    kinds = []
    with tarfile.open(out / "shard-000000.tar") as tar:
        for name in sorted(n for n in tar.getnames() if n.endswith(".json")):
            attrs = json.load(io.BytesIO(tar.extractfile(name).read()))
            kinds.append(attrs.get("kind", "normal"))
            frames = video.decode(tar.extractfile(name.replace(".json", ".mp4")).read())
            assert shots.detect_cuts(frames) == attrs.get("cut_frames", [])
    assert kinds == [
        synth.make_spec(i, frames=16, size=32, cut_fraction=0.5, static_fraction=0.3).kind for i in range(10)
    ]
    assert {"cut", "static", "normal"} <= set(kinds)


def test_cli_refuses_fractions_over_one(tmp_path):
    from pipelines.cli import app

    args = [
        "data",
        "synth",
        "--out",
        str(tmp_path / "x"),
        "--cut-fraction",
        "0.7",
        "--static-fraction",
        "0.5",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "cut_fraction + static_fraction" in res.output
