"""pyoco.video: round trips, clip sampling, seek, resize/crop, and reason-coded errors on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pyoco import video
from pyoco.video import VideoDecodeError
from tests.fixtures_data import audio_only_mp4, smooth_frames, truncated_in_first_frame_mp4


@pytest.fixture(scope="module")
def frames():
    return smooth_frames(num_frames=40, height=48, width=64)


@pytest.fixture(scope="module")
def mp4(frames):
    return video.encode_video(frames, 8, format="mp4")


def test_mp4_round_trip_psnr_above_30db(frames, mp4, tmp_path):
    decoded = video.decode(mp4)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert video.psnr(decoded, frames) > 30.0
    # The path writer (torch input) gives the same stream back.
    path = tmp_path / "clip.mp4"
    video.write_mp4(torch.from_numpy(frames), path, fps=8)
    from_path = video.decode(path)
    assert video.psnr(from_path, frames) > 30.0
    info = video.probe(path)
    assert (info.num_frames, info.width, info.height, info.fps, info.codec) == (40, 64, 48, 8.0, "h264")


@pytest.mark.parametrize("fmt", ["webm", "matroska", "gif"])
def test_other_formats_decode(frames, fmt, tmp_path):
    data = video.encode_video(frames[:12], 8, format=fmt)
    decoded = video.decode(data)
    assert decoded.shape == (12, 48, 64, 3)
    assert video.psnr(decoded, frames[:12]) > (25.0 if fmt == "gif" else 30.0)


def test_gif_writer_to_path(frames, tmp_path):
    video.write_gif(frames[:6], tmp_path / "a.gif", fps=8)
    assert video.probe(tmp_path / "a.gif").num_frames == 6


def test_odd_size_is_padded_and_decodes():
    odd = smooth_frames(num_frames=4, height=21, width=33)
    decoded = video.decode(video.encode_video(odd, 8))
    assert decoded.shape == (4, 22, 34, 3)
    assert video.psnr(decoded[:, :21, :33], odd) > 30.0


def test_stride_target_fps_and_seek_match_sequential(frames, mp4):
    full = video.decode(mp4, seek=False)
    # frame stride 3 from frame 30 (past the seek threshold): seek and no-seek agree, and index correctly
    with_seek = video.decode(mp4, start_frame=30, num_frames=3, frame_stride=3, seek=True)
    no_seek = video.decode(mp4, start_frame=30, num_frames=3, frame_stride=3, seek=False)
    np.testing.assert_array_equal(with_seek, no_seek)
    np.testing.assert_array_equal(with_seek, full[[30, 33, 36]])
    # target fps 4 from an 8 fps source = every other frame
    half = video.decode(mp4, start_frame=1, num_frames=5, target_fps=4)
    np.testing.assert_array_equal(half, full[[1, 3, 5, 7, 9]])


def test_resize_shorter_side_then_center_crop():
    # A 48x96 frame: left half black, right half white, a red column exactly in the middle.
    img = np.zeros((4, 48, 96, 3), np.uint8)
    img[:, :, 48:] = 255
    clip = video.decode(video.encode_video(img, 8), size=24)
    assert clip.shape == (4, 24, 24, 3)
    # shorter side 48 -> 24 (scale 1/2, width 48), center crop keeps x in [12, 36) of the scaled frame:
    # the left 12 columns are black, the right 12 white.
    assert clip[:, :, :10].mean() < 20 and clip[:, :, 14:].mean() > 235


def test_decode_clips_seeded_non_overlapping(mp4):
    a = video.decode_clips(mp4, num_frames=4, frame_stride=2, size=16, max_clips=3, seed=5, key="k")
    b = video.decode_clips(mp4, num_frames=4, frame_stride=2, size=16, max_clips=3, seed=5, key="k")
    assert [c.start_frame for c in a] == [c.start_frame for c in b]
    assert len(a) == 3 and all(c.frames.shape == (4, 16, 16, 3) and c.fps == 4.0 for c in a)
    spans = [(c.frame_indices[0], c.frame_indices[-1]) for c in a]
    assert all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))
    other = video.decode_clips(mp4, num_frames=4, frame_stride=2, max_clips=3, seed=6, key="k")
    assert [c.start_frame for c in other] != [c.start_frame for c in a]
    # each clip equals the same frames decoded one by one
    full = video.decode(mp4, size=16, seek=False)
    for c in a:
        np.testing.assert_array_equal(c.frames, full[c.frame_indices])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda good: b"", "empty_file"),
        (
            lambda good: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
            "decode_error",
        ),
        (lambda good: good[: len(good) // 2], "decode_error"),
        (lambda good: audio_only_mp4(), "no_video_stream"),
        (lambda good: video.encode_video(smooth_frames(num_frames=1), 8), "too_short"),
    ],
    ids=["zero-bytes", "random-bytes", "truncated", "audio-only", "one-frame"],
)
def test_bad_input_raises_reason_coded_error(mp4, make, reason):
    with pytest.raises(VideoDecodeError) as info:
        video.decode_clips(make(mp4), num_frames=4)
    assert info.value.reason == reason
    assert info.value.reason in video.DECODE_REASONS
    assert str(info.value).startswith(reason)


def test_missing_file_and_bad_frames(tmp_path):
    with pytest.raises(FileNotFoundError):
        video.decode(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty_file"):
        video.probe(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        video.encode_video(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        video.encode_video(np.zeros((4, 8, 8, 3), np.float32))


def test_threaded_decode_matches_single_thread(mp4):
    one = video.decode(mp4, size=24, threads=1)
    many = video.decode(mp4, size=24, threads=2)
    auto = video.decode_clips(mp4, num_frames=8, size=24, threads=0, seed=1)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(auto[0].frames, one[auto[0].frame_indices])


@pytest.mark.parametrize("threads", [1, 2])
def test_stream_without_codec_context_is_one_reason_coded_reject(threads):
    """An mp4 cut inside its first frame's description: a video stream whose codec_context is None. Every
    entry point gives one decode_error naming the cause, never an AttributeError/PermissionError."""
    data = truncated_in_first_frame_mp4()
    calls = [
        lambda: video.decode_clips(data, num_frames=4, size=16, threads=threads),
        lambda: video.decode(data, size=16, threads=threads),
        lambda: video.probe(data),
    ]
    for call in calls:
        with pytest.raises(VideoDecodeError) as info:
            call()
        assert info.value.reason == "decode_error" and "no codec context" in info.value.detail


def test_pyav_pin_excludes_the_deadlocking_release_and_admits_the_tested_one():
    from importlib.metadata import version

    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    av_req = next(Requirement(d) for d in deps["dependencies"] if Requirement(d).name == "av")
    assert version("av") in av_req.specifier  # the installed version is the tested one
    assert "17.0.1" not in av_req.specifier
    assert any(s.operator in ("<", "<=", "~=", "==") for s in av_req.specifier), "no upper bound"
