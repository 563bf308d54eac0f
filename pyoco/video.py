"""Video I/O with PyAV: clip decoding (threaded, seek to the clip start, frame stride or target fps,
shorter-side resize + center crop) and mp4 (libx264) / GIF / WebM / MKV writers.

Layouts: every frame array here is uint8 ``(T, H, W, 3)`` RGB.

    clips = decode_clips(mp4_bytes, num_frames=8, frame_stride=2, size=64, max_clips=2, seed=0)
    frames = decode(path, start_frame=10, num_frames=8, size=64)          # one clip
    write_mp4(frames, "s3://bucket/out.mp4", fps=8)

Bad input never surfaces as a bare PyAV/FFmpeg exception: it raises :class:`VideoDecodeError` whose
``reason`` is one of the stable codes in :data:`DECODE_REASONS`.

Clip sampling. With a source of ``N`` frames, a clip takes source frames ``start + round(i * step)`` for
``i < num_frames`` where ``step = frame_stride`` or ``src_fps / target_fps`` when a target fps is given
(its fps is then ``src_fps / step``). Clip starts are drawn with a ``random.Random`` seeded by
``(seed, key)``, so a video always yields the same clips whatever worker decodes it. Clips of one video
do not overlap when there is room; a video shorter than one clip span is ``too_short``.

Shot-aware clips (``decode_clips(..., shot_aware=True)``, what preprocess uses): every frame is decoded
(at ``min(size, SCAN_SIZE)`` px), :func:`pyoco.shots.detect_cuts` finds the shot cuts, and clips are drawn
only from windows inside one shot (:func:`plan_shot_clips`), so no clip ever spans a cut. A video whose
shots are all shorter than one clip span is ``shots_too_short``.

Over 400 lines because it is the one module that touches PyAV: decoding (probe, clip plan, threaded seek)
and the writers; decode and encode could be split apart later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyoco.errors import InputError

DECODE_REASONS = ("empty_file", "no_video_stream", "decode_error", "too_short", "shots_too_short")
# Shot-aware decoding (``shot_aware=True``) detects cuts on every frame at most this many px per side: a
# colour histogram needs few pixels, and 64 px frames cost 12 KiB each.
SCAN_SIZE = 64


class VideoDecodeError(InputError):
    """A video that can't be used. ``reason`` is a stable code (see DECODE_REASONS), ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # exact when the container says so or when packets were counted
    fps: float
    width: int
    height: int
    codec: str
    container: str


@dataclasses.dataclass
class Clip:
    start_frame: int  # index of its first source frame
    frame_indices: list[int]  # source frame indices, len == num_frames
    fps: float  # the clip's own frame rate
    frames: np.ndarray | None = None  # uint8 (T, H, W, 3)
    cuts: list[int] | None = None  # shot-aware decoding: the shot cuts found in the whole video


# ------------------------------------------------------------------------------------------------- opening
def _as_file(src: Any):
    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise VideoDecodeError("empty_file", "0 bytes")
        return io.BytesIO(bytes(src))
    if isinstance(src, str | Path):
        s = str(src)
        if "://" in s and not s.startswith("file://"):
            from pyoco import storage

            return _as_file(storage.read_bytes(s))
        p = Path(s.removeprefix("file://"))
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such video file")
        if p.stat().st_size == 0:
            raise VideoDecodeError("empty_file", f"{p}: 0 bytes")
        return str(p)
    return src  # file-like


def _open(src: Any):
    import av

    f = _as_file(src)
    try:
        return av.open(f, mode="r", metadata_errors="ignore")
    except MemoryError:
        raise
    except av.error.InvalidDataError as err:
        raise VideoDecodeError("decode_error", f"not a readable video container ({_short(err)})") from None
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:
        raise VideoDecodeError("decode_error", f"can't open the container ({_short(err)})") from None


def _short(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}"[:300]


def _video_stream(container):
    streams = [s for s in container.streams if s.type == "video"]
    # An attached picture (cover art) is not a video.
    streams = [s for s in streams if not (s.disposition and "attached_pic" in str(s.disposition).lower())]
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        if not kinds:  # nothing parsed at all (an mp4 cut before its moov?): not a readable container
            raise VideoDecodeError(
                "decode_error", "no streams found (file cut off, or not a video container?)"
            )
        raise VideoDecodeError("no_video_stream", f"streams: {', '.join(kinds)}")
    stream = streams[0]
    # A file cut off inside its first frame's description can list a video stream whose codec was never
    # set up; decoding it (threaded, especially) dereferences nothing and may crash the process.
    if stream.codec_context is None:
        raise VideoDecodeError("decode_error", "the video stream has no codec context (file cut off early?)")
    return stream


def _fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0 and math.isfinite(float(rate)):
            return float(rate)
    return 25.0


def _count_frames(container, stream) -> int:
    """Exact frame count: the header's when present, else by demuxing (no decoding) non-empty packets."""
    n = int(stream.frames or 0)
    if n > 0:
        return n
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                n += 1
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - FFmpeg errors of many kinds
        raise VideoDecodeError("decode_error", f"while counting frames: {_short(err)}") from None
    container.seek(0, stream=stream, backward=True, any_frame=False)
    return n


def probe(src: Any) -> VideoInfo:
    """Frame count, fps, size and codec of the first video stream."""
    with _open(src) as container:
        stream = _video_stream(container)
        return VideoInfo(
            num_frames=_count_frames(container, stream),
            fps=_fps(stream),
            width=int(stream.codec_context.width or 0),
            height=int(stream.codec_context.height or 0),
            codec=str(stream.codec_context.name),
            container=str(container.format.name),
        )


# -------------------------------------------------------------------------------------------- clip choice
def clip_step(src_fps: float, *, frame_stride: int = 1, target_fps: float | None = None) -> float:
    """Source frames per clip frame: ``frame_stride``, or ``src_fps / target_fps`` when a target is set."""
    if target_fps is not None:
        if target_fps <= 0:
            raise InputError(f"target_fps must be > 0 (got {target_fps})")
        return src_fps / target_fps
    if frame_stride < 1:
        raise InputError(f"frame_stride must be >= 1 (got {frame_stride})")
    return float(frame_stride)


def plan_clips(
    total_frames: int,
    src_fps: float,
    *,
    num_frames: int,
    frame_stride: int = 1,
    target_fps: float | None = None,
    max_clips: int = 1,
    seed: int = 0,
    key: str = "",
) -> list[Clip]:
    """Choose up to ``max_clips`` seeded, non-overlapping clips; ``too_short`` when not even one fits."""
    step = clip_step(src_fps, frame_stride=frame_stride, target_fps=target_fps)
    offsets = [round(i * step) for i in range(num_frames)]
    span = offsets[-1] + 1
    if total_frames < span:
        raise VideoDecodeError(
            "too_short", f"{total_frames} frames, a clip of {num_frames} at step {step:g} needs {span}"
        )
    slots = total_frames // span  # non-overlapping clip positions available
    n = min(max_clips, max(slots, 1))
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big"))
    if n == 1:
        starts = [rng.randint(0, total_frames - span)]
    else:
        # Split the video into n equal windows and draw one start inside each: no overlap, seeded.
        window = total_frames // n
        starts = [i * window + rng.randint(0, window - span) for i in range(n)]
    clip_fps = src_fps / step
    return [Clip(start_frame=s, frame_indices=[s + o for o in offsets], fps=clip_fps) for s in sorted(starts)]


def plan_shot_clips(
    total_frames: int,
    src_fps: float,
    cuts: list[int],
    *,
    num_frames: int,
    frame_stride: int = 1,
    target_fps: float | None = None,
    max_clips: int = 1,
    seed: int = 0,
    key: str = "",
) -> list[Clip]:
    """Up to ``max_clips`` seeded, non-overlapping clips, each inside one shot of ``cuts``
    (:func:`pyoco.shots.shot_ranges`): every shot is tiled with clip windows from a seeded shift, and the
    clips are a seeded sample of those windows. ``too_short`` / ``shots_too_short`` when none fits."""
    from pyoco import shots

    step = clip_step(src_fps, frame_stride=frame_stride, target_fps=target_fps)
    offsets = [round(i * step) for i in range(num_frames)]
    span = shots.clip_span(num_frames, step)
    if total_frames < span:
        raise VideoDecodeError(
            "too_short", f"{total_frames} frames, a clip of {num_frames} at step {step:g} needs {span}"
        )
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big"))
    starts = []
    ranges = shots.shot_ranges(total_frames, cuts)
    for a, b in ranges:
        if b - a < span:
            continue
        shift = rng.randint(0, (b - a) % span)  # the slack a tiling from the shot's first frame leaves
        starts += [a + shift + w for w, _ in shots.clip_windows(b - a - shift, [], num_frames, step)]
    if not starts:
        lengths = ", ".join(str(b - a) for a, b in ranges)[:200]
        raise VideoDecodeError(
            "shots_too_short", f"cuts at {cuts[:20]}: shots of {lengths} frames, a clip needs {span}"
        )
    chosen = sorted(rng.sample(starts, min(max_clips, len(starts))))
    clip_fps = src_fps / step
    return [Clip(start_frame=s, frame_indices=[s + o for o in offsets], fps=clip_fps) for s in chosen]


# --------------------------------------------------------------------------------------------- frame work
def _resize_crop(frame, size: int | None) -> np.ndarray:
    """Shorter side to ``size`` (area filter), then center crop to ``size x size``; RGB uint8."""
    if size is None:
        return frame.to_ndarray(format="rgb24", threads=1)
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    # threads=1: PyAV 18 defaults swscale to one thread per visible CPU; on tiny frames the hand-offs cost
    # more than they save (2.4x slower, measured), and pyoco already runs one decode task per core.
    arr = frame.reformat(
        width=new_w, height=new_h, format="rgb24", interpolation="AREA", threads=1
    ).to_ndarray()
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def decode_clips(
    src: Any,
    *,
    num_frames: int,
    frame_stride: int = 1,
    target_fps: float | None = None,
    size: int | None = None,
    max_clips: int = 1,
    seed: int = 0,
    key: str = "",
    threads: int = 1,
    seek: bool = True,
    shot_aware: bool = False,
) -> list[Clip]:
    """Decode up to ``max_clips`` clips of ``num_frames`` (see the module doc for how they are chosen).

    ``threads``: FFmpeg decoder threads (0 = FFmpeg decides). ``seek``: jump to each clip's start (to the
    preceding keyframe) instead of decoding every frame before it. ``shot_aware``: no clip spans a shot
    cut (module doc); each returned clip's ``cuts`` lists the cuts found in the whole video.
    """
    import av

    plan = dict(
        num_frames=num_frames,
        frame_stride=frame_stride,
        target_fps=target_fps,
        max_clips=max_clips,
        seed=seed,
        key=key,
    )
    with _open(src) as container:
        stream = _video_stream(container)
        _configure_threads(stream, threads)
        try:
            fps = _fps(stream)
            if shot_aware:
                clips = _decode_shot_aware(container, stream, fps, size=size, seek=seek, plan=plan)
                total = int(stream.frames or 0)
            else:
                total = _count_frames(container, stream)
                clips = plan_clips(total, fps, **plan)
                _decode_into(container, stream, clips, size=size, fps=fps, seek=seek)
        except (VideoDecodeError, MemoryError):
            raise  # out of memory is the worker's problem, never a property of the video
        except (av.error.FFmpegError, ValueError, OSError, EOFError, RuntimeError) as err:
            raise VideoDecodeError("decode_error", _short(err)) from None
    done = [c for c in clips if c.frames is not None]
    if not done:
        raise VideoDecodeError("too_short", f"decoded fewer frames than the {total} the container declares")
    return done


def decode(
    src: Any,
    *,
    start_frame: int = 0,
    num_frames: int | None = None,
    frame_stride: int = 1,
    target_fps: float | None = None,
    size: int | None = None,
    threads: int = 1,
    seek: bool = True,
) -> np.ndarray:
    """One clip starting at ``start_frame`` (``num_frames=None``: to the end); uint8 (T, H, W, 3)."""
    import av

    with _open(src) as container:
        stream = _video_stream(container)
        _configure_threads(stream, threads)
        try:
            fps = _fps(stream)
            step = clip_step(fps, frame_stride=frame_stride, target_fps=target_fps)
            if num_frames is None:
                total = _count_frames(container, stream)
                num_frames = max(0, math.floor((total - 1 - start_frame) / step) + 1)
                if num_frames == 0:
                    raise VideoDecodeError("too_short", f"{total} frames, start {start_frame}")
            idx = [start_frame + round(i * step) for i in range(num_frames)]
            clip = Clip(start_frame=start_frame, frame_indices=idx, fps=fps / step)
            _decode_into(container, stream, [clip], size=size, fps=fps, seek=seek)
        except (VideoDecodeError, MemoryError):
            raise  # out of memory is the worker's problem, never a property of the video
        except (av.error.FFmpegError, ValueError, OSError, EOFError, RuntimeError) as err:
            raise VideoDecodeError("decode_error", _short(err)) from None
    if clip.frames is None:
        raise VideoDecodeError("too_short", f"fewer than {idx[-1] + 1} frames")
    return clip.frames


def _decode_shot_aware(
    container, stream, fps: float, *, size: int | None, seek: bool, plan: dict
) -> list[Clip]:
    """Decode every frame at ``min(size, SCAN_SIZE)`` px, find the cuts, plan clips inside shots, and fill
    them: from the scanned frames when they are already at ``size``, else by a second (seeking) pass."""
    from pyoco import shots

    scan = SCAN_SIZE if size is None else min(size, SCAN_SIZE)
    decoded = [_resize_crop(f, scan) for f in container.decode(stream)]
    if not decoded:
        raise VideoDecodeError("too_short", "the stream decoded to no frames")
    frames = np.stack(decoded)
    cuts = shots.detect_cuts(frames)
    clips = plan_shot_clips(len(frames), fps, cuts, **plan)
    if scan == size:
        for c in clips:
            c.frames = np.ascontiguousarray(frames[c.frame_indices])
    else:
        container.seek(0, stream=stream, backward=True, any_frame=False)
        _decode_into(container, stream, clips, size=size, fps=fps, seek=seek)
    for c in clips:
        c.cuts = list(cuts)
    return clips


def _configure_threads(stream, threads: int) -> None:
    ctx = stream.codec_context
    if threads == 1:  # explicitly: PyAV's default is 0, one slice thread per visible CPU
        ctx.thread_count = 1
        return
    ctx.thread_type = "AUTO"  # frame + slice threading
    ctx.thread_count = threads  # 0: FFmpeg picks


def _frame_index(frame, stream, fps: float, t0: float) -> int | None:
    if frame.pts is None or stream.time_base is None:
        return None
    return round((float(frame.pts * stream.time_base) - t0) * fps)


def _decode_into(container, stream, clips: list[Clip], *, size: int | None, fps: float, seek: bool) -> None:
    """Fill ``clip.frames`` for each clip (in start order), seeking to each clip's start when it helps.

    Frames are numbered by timestamp (``(pts - start) * fps``) after a seek and by counting otherwise;
    a clip the stream ends before completing keeps ``frames=None``.
    """
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    gop_guess = 24  # seeking only pays off for a clip that starts well past the current position
    position = 0  # next source frame index the decoder will produce when counting
    use_pts = False
    for clip in clips:
        wanted = {i: n for n, i in enumerate(clip.frame_indices)}
        out: list[np.ndarray | None] = [None] * len(clip.frame_indices)
        if seek and clip.start_frame - position > gop_guess and stream.time_base is not None:
            target = t0 + clip.start_frame / fps
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
            use_pts = True
        last_needed = clip.frame_indices[-1]
        got = 0
        for frame in container.decode(stream):
            idx = _frame_index(frame, stream, fps, t0) if use_pts else position
            if idx is None:  # no timestamps: fall back to counting from here
                idx = position
            position = idx + 1
            slot = wanted.get(idx)
            if slot is not None and out[slot] is None:
                out[slot] = _resize_crop(frame, size)
                got += 1
            if idx >= last_needed:
                break
        if got == len(out):
            clip.frames = np.stack(out)  # type: ignore[arg-type]
        elif got:
            # Timestamps of some codecs skip an index; repeat the previous decoded frame into such holes.
            filled = _fill_holes(out)
            if filled is not None and got >= 0.9 * len(out):
                clip.frames = filled


def _fill_holes(frames: list[np.ndarray | None]) -> np.ndarray | None:
    first = next((f for f in frames if f is not None), None)
    if first is None:
        return None
    prev = first
    filled = []
    for f in frames:
        prev = f if f is not None else prev
        filled.append(prev)
    return np.stack(filled)


# ------------------------------------------------------------------------------------------------ writers
def _as_uint8_frames(frames: Any) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3); got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1:
        raise ValueError("frames: need at least one frame")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8; got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: replicate the last row/column when odd."""
    t, h, w, _ = arr.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return arr


# container format -> (codec, pixel format, codec options)
_FORMATS = {
    "mp4": ("libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    "webm": ("libvpx-vp9", "yuv420p", {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "matroska": ("libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    "gif": ("gif", "rgb8", {}),  # only used when a codec is forced; see _encode_gif
}


def encode_video(
    frames: Any,
    fps: float = 8,
    *,
    format: str = "mp4",
    codec: str | None = None,
    options: dict[str, str] | None = None,
) -> bytes:
    """Encode uint8 (T, H, W, 3) frames (numpy or torch) into an in-memory file of ``format``."""
    import fractions

    import av

    arr = _as_uint8_frames(frames)
    if format == "gif" and codec in (None, "gif"):
        return _encode_gif(arr, fps)
    default_codec, pix_fmt, default_opts = _FORMATS.get(format, ("libx264", "yuv420p", {}))
    codec = codec or default_codec
    opts = dict(default_opts if codec == default_codec else {})
    opts.update(options or {})
    if pix_fmt == "yuv420p":
        arr = _pad_even(arr)
    buf = io.BytesIO()
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format=format) as out:
        stream = out.add_stream(codec, rate=rate, options=opts)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = pix_fmt
        for img in arr:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _encode_gif(arr: np.ndarray, fps: float) -> bytes:
    """GIF via Pillow: an adaptive 256-colour palette per frame (FFmpeg's gif encoder alone gives 3-3-2)."""
    from PIL import Image

    images = [Image.fromarray(img).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for img in arr]
    buf = io.BytesIO()
    duration_ms = max(20, round(1000 / fps))
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def _write(data: bytes, path_or_uri: str | os.PathLike) -> None:
    from pyoco import storage

    storage.write_bytes(str(path_or_uri), data)


def write_mp4(frames: Any, path_or_uri: str | os.PathLike, fps: float = 8, *, crf: int = 18) -> None:
    """H.264 (libx264, yuv420p) mp4 at a local path or URI. Odd sizes are padded by one edge pixel."""
    _write(
        encode_video(frames, fps, format="mp4", options={"crf": str(crf), "preset": "veryfast"}), path_or_uri
    )


def write_gif(frames: Any, path_or_uri: str | os.PathLike, fps: float = 8) -> None:
    """Animated GIF (256-colour palette per frame) at a local path or URI."""
    _write(encode_video(frames, fps, format="gif"), path_or_uri)


def write_video(frames: Any, path_or_uri: str | os.PathLike, fps: float = 8) -> None:
    """By extension: .mp4, .gif, .webm (VP9) or .mkv (H.264 in Matroska)."""
    ext = str(path_or_uri).rsplit(".", 1)[-1].lower()
    fmt = {"mp4": "mp4", "gif": "gif", "webm": "webm", "mkv": "matroska"}.get(ext)
    if fmt is None:
        raise InputError(f"{path_or_uri}: unknown video extension .{ext} (mp4, gif, webm, mkv)")
    _write(encode_video(frames, fps, format=fmt), path_or_uri)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 arrays of the same shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def stack_frames(frames: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(list(frames)).astype(np.uint8)
