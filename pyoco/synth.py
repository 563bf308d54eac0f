"""The synthetic moving-shapes dataset: deterministic WebDataset shards with exact ground truth.

Each video shows one coloured shape (circle, square or triangle) moving in a straight line (left, right,
up or down) at a constant speed over a plain or a static-noise background. Every sample is three tar
members sharing a key:

- ``{key}.mp4``: H.264, ``frames`` frames of ``size x size`` at ``fps``;
- ``{key}.txt``: a caption in varied wording ("a red circle moves to the left", "red circle sliding left,
  fast", ...), UTF-8;
- ``{key}.json``: the ground truth the caption was written from (see :class:`ShapeSpec`): ``shape``,
  ``color``, ``direction``, ``speed`` (``slow``/``fast``), ``speed_px_per_frame`` (exact, float),
  ``background``, ``start_xy``/``end_xy`` (shape centre, px), ``radius_px``, ``frames``, ``size``, ``fps``,
  ``seed``, ``index``.

Two optional kinds of video give shot and motion detection their ground truth (``cut_fraction`` and
``static_fraction`` of :func:`write_dataset`, ``--cut-fraction``/``--static-fraction`` of ``pyoco data
synth``; both 0 by default, and then every shard is byte-identical to one written without them):

- *cut*: at frame ``cut_frame`` the video switches hard to a second shot with another shape, colour and
  background colour, moving its own way; the ``.json`` adds ``kind: "cut"``, ``cut_frames: [cut_frame]``
  (the first frame of the new shot) and ``second_shot`` (that shot's attributes). The caption describes the
  first shot.
- *static*: the shape does not move (``speed: "static"``, ``speed_px_per_frame: 0``, ``direction: null``,
  ``kind: "static"``); the caption says it stands still.

A ``.json`` without ``kind`` is a normal video: one shot, moving.

Everything follows from ``(seed, index)``: the same arguments produce byte-identical shards (tar headers
carry mtime 0 and no owner; the encoder runs single-threaded). The shape stays fully inside the frame for
the whole clip, so the direction is always visible.

    specs = [make_spec(i, seed=0, frames=24, size=64) for i in range(4)]
    frames = render(specs[0])                       # uint8 (T, H, W, 3)
    write_dataset("s3://bucket/raw", videos=64, shards=4, seed=0)

Over 400 lines because the generator stays with its ground-truth scorer (:func:`score_video`,
:func:`prompt_accuracy`, which checks videos against :class:`ShapeSpec`'s fields).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator

import numpy as np

from pyoco.errors import InputError

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slow": 0.35, "fast": 1.0}  # fraction of the largest speed that keeps the shape in frame
BACKGROUNDS = ("plain", "noisy")
_BG_COLORS = ((20, 20, 24), (45, 45, 50), (10, 25, 35))

_STATIC_TEMPLATES = (
    "a {color} {shape} standing still",
    "a still {color} {shape}",
    "the {color} {shape} does not move",
)
KINDS = ("normal", "cut", "static")

_TEMPLATES = (
    "a {color} {shape} moves to the {dirword}",
    "a {color} {shape} moving {dirword}",
    "the {color} {shape} slides {dirword_to}",
    "{a_speed} {color} {shape} travels {dirword_to}",
    "a {color} {shape} drifting {dirword_to} {speed_adv}",
    "{color} {shape} moving {dirword}, {speed}",
    "a {shape} in {color} goes {dirword_to} {speed_adv}",
)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    index: int
    seed: int
    shape: str
    color: str
    direction: str
    speed: str  # "slow" | "fast"
    speed_px_per_frame: float
    background: str  # "plain" | "noisy"
    background_rgb: tuple[int, int, int]
    radius_px: float
    start_xy: tuple[float, float]
    frames: int
    size: int
    fps: int
    caption: str
    kind: str = "normal"  # see KINDS and the module doc
    cut_frame: int | None = None  # kind "cut": the first frame of second_shot
    second_shot: ShapeSpec | None = None  # kind "cut": the shot from cut_frame on (its frames: the rest)

    @property
    def key(self) -> str:
        return f"{self.index:08d}"

    @property
    def end_xy(self) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        d = self.speed_px_per_frame * (self.frames - 1)
        return (self.start_xy[0] + dx * d, self.start_xy[1] + dy * d)

    def attributes(self) -> dict:
        """The ground truth written to ``{key}.json``."""
        out = {
            "key": self.key,
            "index": self.index,
            "seed": self.seed,
            "shape": self.shape,
            "color": self.color,
            "direction": self.direction,
            "speed": self.speed,
            "speed_px_per_frame": self.speed_px_per_frame,
            "background": self.background,
            "radius_px": self.radius_px,
            "start_xy": list(self.start_xy),
            "end_xy": list(self.end_xy),
            "frames": self.frames,
            "size": self.size,
            "fps": self.fps,
            "caption": self.caption,
        }
        if self.kind == "static":
            out.update(kind="static", direction=None)
        elif self.kind == "cut":
            second = {k: v for k, v in self.second_shot.attributes().items() if k in _SHOT_FIELDS}
            out.update(kind="cut", cut_frames=[self.cut_frame], second_shot=second)
        return out


_SHOT_FIELDS = ("shape", "color", "direction", "speed", "speed_px_per_frame", "background", "radius_px")
_SHOT_FIELDS += ("start_xy", "end_xy", "frames")


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"pyoco-synth/{seed}/{index}")


def caption_for(shape: str, color: str, direction: str, speed: str, rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    return template.format(
        color=color,
        shape=shape,
        dirword=direction,
        dirword_to=f"to the {direction}" if direction in ("left", "right") else direction,
        speed=speed,
        a_speed="a slow" if speed == "slow" else "a fast",
        speed_adv="slowly" if speed == "slow" else "quickly",
    )


def make_spec(
    index: int,
    *,
    seed: int = 0,
    frames: int = 24,
    size: int = 64,
    fps: int = 8,
    cut_fraction: float = 0.0,
    static_fraction: float = 0.0,
) -> ShapeSpec:
    """The attributes of video ``index``; a pure function of its arguments.

    ``cut_fraction`` / ``static_fraction``: the chance that the video is a *cut* / *static* one (module
    doc), drawn from a stream of its own, so the attributes of a normal video never depend on them."""
    if frames < 1 or size < 8 or fps < 1:
        raise InputError(f"need frames >= 1, size >= 8, fps >= 1 (got {frames}, {size}, {fps})")
    if cut_fraction < 0 or static_fraction < 0 or cut_fraction + static_fraction > 1:
        raise InputError(
            f"need cut_fraction, static_fraction >= 0 with sum <= 1 (got {cut_fraction}, {static_fraction})"
        )
    rng = _rng(seed, index)
    spec = _draw_shot(rng, index=index, seed=seed, frames=frames, size=size, fps=fps)
    kind_rng = random.Random(f"pyoco-synth-kind/{seed}/{index}")
    u = kind_rng.random()
    if u < static_fraction:
        rng_caption = random.Random(f"pyoco-synth-static/{seed}/{index}")
        caption = rng_caption.choice(_STATIC_TEMPLATES).format(color=spec.color, shape=spec.shape)
        return dataclasses.replace(
            spec, kind="static", speed="static", speed_px_per_frame=0.0, caption=caption
        )
    if u < static_fraction + cut_fraction and frames >= 4:
        cut = kind_rng.randint(frames // 4, (3 * frames) // 4)
        second = _draw_shot(
            kind_rng, index=index, seed=seed, frames=frames - cut, size=size, fps=fps, avoid=spec
        )
        return dataclasses.replace(spec, kind="cut", cut_frame=cut, second_shot=second)
    return spec


def _draw_shot(
    rng: random.Random,
    *,
    index: int,
    seed: int,
    frames: int,
    size: int,
    fps: int,
    avoid: ShapeSpec | None = None,
) -> ShapeSpec:
    """One shot's attributes from ``rng``; with ``avoid``, its shape, colour and background colour all
    differ from that shot's (a hard cut). Without it the draws are those of every earlier version."""

    def pick(options, taken=None):
        return rng.choice([o for o in options if o != taken])

    shape = pick(SHAPES, avoid and avoid.shape)
    color = pick(sorted(COLORS), avoid and avoid.color)
    direction = rng.choice(sorted(DIRECTIONS))
    speed = rng.choice(sorted(SPEEDS))
    background = rng.choice(BACKGROUNDS)
    bgs = [c for c in _BG_COLORS if avoid is None or c != avoid.background_rgb]
    bg = bgs[rng.randrange(len(bgs))]
    radius = round(size * rng.uniform(0.10, 0.16), 2)
    margin = radius + 1.0
    room = size - 2 * margin  # centre range that keeps the shape inside the frame
    speed_px = round(SPEEDS[speed] * room / max(1, frames - 1), 4) if frames > 1 else 0.0
    travel = speed_px * (frames - 1)
    dx, dy = DIRECTIONS[direction]

    def axis_start(d: int) -> float:
        if d > 0:
            return round(margin + rng.uniform(0, room - travel), 2)
        if d < 0:
            return round(size - margin - rng.uniform(0, room - travel), 2)
        return round(margin + rng.uniform(0, room), 2)

    start = (axis_start(dx), axis_start(dy))
    caption = caption_for(shape, color, direction, speed, rng)
    return ShapeSpec(
        index=index,
        seed=seed,
        shape=shape,
        color=color,
        direction=direction,
        speed=speed,
        speed_px_per_frame=speed_px,
        background=background,
        background_rgb=bg,
        radius_px=radius,
        start_xy=start,
        frames=frames,
        size=size,
        fps=fps,
        caption=caption,
    )


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.886  # same area as the circle
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # pointing up, base at cy + r
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # base 2r, height 2r
    raise InputError(f"unknown shape {shape!r}")


def render(spec: ShapeSpec) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of ``spec`` (a *cut* video: its second shot from ``cut_frame`` on)."""
    if spec.kind == "cut":
        return np.concatenate(
            [_render_shot(spec, spec.cut_frame, 7), _render_shot(spec.second_shot, None, 8)]
        )
    return _render_shot(spec, None, 7)


def _render_shot(spec: ShapeSpec, frames: int | None, noise_stream: int) -> np.ndarray:
    size = spec.size
    frames = spec.frames if frames is None else frames
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    background = np.empty((size, size, 3), np.uint8)
    background[:] = spec.background_rgb
    if spec.background == "noisy":
        noise = np.random.default_rng([spec.seed, spec.index, noise_stream]).normal(0, 18, (size, size, 1))
        background = np.clip(background.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    color = np.array(COLORS[spec.color], np.uint8)
    dx, dy = DIRECTIONS[spec.direction]
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        cx = spec.start_xy[0] + dx * spec.speed_px_per_frame * t
        cy = spec.start_xy[1] + dy * spec.speed_px_per_frame * t
        out[t] = background
        out[t][_shape_mask(spec.shape, xx, yy, cx, cy, spec.radius_px)] = color
    return out


def encode_sample(spec: ShapeSpec) -> dict[str, bytes]:
    """The three tar members of one sample, keyed by extension."""
    from pyoco.video import encode_video

    mp4 = encode_video(
        render(spec), spec.fps, format="mp4", options={"crf": "18", "preset": "veryfast", "threads": "1"}
    )
    return {
        "mp4": mp4,
        "txt": spec.caption.encode("utf-8"),
        "json": json.dumps(spec.attributes(), sort_keys=True).encode("utf-8"),
    }


def shard_ranges(videos: int, shards: int) -> list[range]:
    """Contiguous, near-equal index ranges, one per shard (empty shards are not produced)."""
    shards = max(1, min(shards, videos))
    bounds = [round(k * videos / shards) for k in range(shards + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(shards)]


def tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def build_shard(specs: list[ShapeSpec]) -> bytes:
    """An uncompressed WebDataset tar of the samples, byte-for-byte deterministic."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for spec in specs:
            for ext, data in encode_sample(spec).items():
                tar.addfile(*tar_member(f"{spec.key}.{ext}", data))
    return buf.getvalue()


def iter_shards(
    *,
    videos: int,
    shards: int,
    seed: int = 0,
    frames: int = 24,
    size: int = 64,
    fps: int = 8,
    cut_fraction: float = 0.0,
    static_fraction: float = 0.0,
) -> Iterator[tuple[str, list[ShapeSpec], bytes]]:
    """``(shard file name, specs, tar bytes)`` for each shard, in order."""
    kinds = {"cut_fraction": cut_fraction, "static_fraction": static_fraction}
    for k, idx in enumerate(shard_ranges(videos, shards)):
        specs = [make_spec(i, seed=seed, frames=frames, size=size, fps=fps, **kinds) for i in idx]
        yield f"shard-{k:06d}.tar", specs, build_shard(specs)


SYNTH_MARKER = ".pyoco-synth.json"  # in the output folder: the shards this tool wrote there


def _existing_files(out: str) -> set[str]:
    """Paths of the files under ``out``, relative to it."""
    from pyoco import storage

    fs, root = storage.filesystem(out)
    if not fs.exists(root):
        return set()
    return {p[len(root) :].lstrip("/") for p in fs.find(root)}


def previous_shards(out: str) -> list[str]:
    """The shards an earlier run wrote to ``out`` ([] when it is empty or absent); InputError when ``out``
    holds anything else."""
    from pyoco import storage

    existing = _existing_files(out)
    if not existing:
        return []
    if SYNTH_MARKER not in existing:
        raise InputError(
            f"{out}: not empty and not a `pyoco data synth` output (no {SYNTH_MARKER}); "
            "choose an empty or new folder"
        )
    previous = list(json.loads(storage.read_bytes(storage.join(out, SYNTH_MARKER))).get("shards", []))
    foreign = sorted(existing - {SYNTH_MARKER, *previous})
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(
            f"{out}: holds files that `pyoco data synth` did not write ({foreign[0]}{more}); "
            "choose an empty or new folder"
        )
    return previous


def write_config(cfg, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """:func:`write_dataset` with every field of a ``pyoco.config.SynthConfig``: the CLI and the workflow
    both call this, so a new synth option cannot be dropped by one of them."""
    fields = ("videos", "shards", "seed", "frames", "size", "fps", "cut_fraction", "static_fraction")
    return write_dataset(cfg.out, **{f: getattr(cfg, f) for f in fields}, progress=progress)


def write_dataset(
    out: str,
    *,
    videos: int = 64,
    shards: int = 4,
    seed: int = 0,
    frames: int = 24,
    size: int = 64,
    fps: int = 8,
    cut_fraction: float = 0.0,
    static_fraction: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the shards under ``out`` (local folder or s3:// prefix); returns a small summary.

    ``progress(videos_done, videos_total)`` is called after each shard. ``cut_fraction`` and
    ``static_fraction``: the share of *cut* and *static* videos (module doc).

    ``out`` must be empty or a previous output of this function, recognised by its ``.pyoco-synth.json``
    marker, which lists the shards it wrote. A rerun replaces those, so a smaller rerun never leaves stale
    shards of a larger one for preprocess to ingest. The marker always covers every shard present (it is
    written before the shards with the old and new names, and rewritten with the new ones at the end), so
    an interrupted run can be rerun too. Any other file in ``out`` is refused, never deleted.
    """
    from pyoco import storage

    if videos < 1 or shards < 1:
        raise InputError(f"need videos >= 1 and shards >= 1 (got {videos}, {shards})")
    marker = storage.join(out, SYNTH_MARKER)
    previous = previous_shards(out)
    new_names = [f"shard-{k:06d}.tar" for k in range(len(shard_ranges(videos, shards)))]
    storage.write_bytes(marker, json.dumps({"shards": sorted({*previous, *new_names})}).encode())
    done = 0
    names = []
    total_bytes = 0
    for name, specs, data in iter_shards(
        videos=videos,
        shards=shards,
        seed=seed,
        frames=frames,
        size=size,
        fps=fps,
        cut_fraction=cut_fraction,
        static_fraction=static_fraction,
    ):
        storage.write_bytes(storage.join(out, name), data)
        names.append(name)
        total_bytes += len(data)
        done += len(specs)
        if progress is not None:
            progress(done, videos)
    for stale in sorted(set(previous) - set(names)):
        storage.remove(storage.join(out, stale))
    storage.write_bytes(marker, json.dumps({"shards": names}).encode())
    return {"out": out, "videos": videos, "shards": names, "bytes": total_bytes, "seed": seed}


# ----------------------------------------------------------------------------------------------------------
# Scoring generated videos against the ground truth, by pixels


@dataclasses.dataclass(frozen=True)
class VideoScore:
    """What :func:`score_video` reads off one video."""

    color: str | None  # the palette colour most shape pixels are nearest to; None: no shape pixels
    direction: str | None  # the axis and sign of the shape's motion; None: no shape, or it moved < min_motion
    motion_px: float  # centroid displacement, first to last frame (px; 0.0 without a shape in both)
    shape_fraction: float  # mean fraction of pixels per frame classified as shape


_PALETTE_NAMES = tuple(sorted(COLORS))
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float32)  # (K, 3)


def score_video(frames: np.ndarray, *, min_motion_px: float = 0.5) -> VideoScore:
    """Read the colour and motion direction of the one shape in ``frames`` (uint8 (T, H, W, 3)).

    Each frame's background is its per-channel median colour (the shape covers a few % of the frame). A pixel
    belongs to the shape when it is nearer to some palette colour (:data:`COLORS`) than to that background;
    the video's colour is the palette colour most such pixels are nearest to. Direction: the centroid of the
    pixels of that colour in the first frame vs the last; the larger axis of the displacement and its sign
    name one of :data:`DIRECTIONS`. A displacement under ``min_motion_px`` (a frozen video) has no direction.
    """
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 2:
        raise ValueError(f"expected uint8 frames (T >= 2, H, W, 3), got shape {x.shape}")
    x = x.astype(np.float32)
    bg = np.median(x.reshape(x.shape[0], -1, 3), axis=1)[:, None, None, :]  # (T, 1, 1, 3)
    d_bg = np.linalg.norm(x - bg, axis=-1)  # (T, H, W)
    d_pal = np.linalg.norm(x[..., None, :] - _PALETTE, axis=-1)  # (T, H, W, K)
    nearest = d_pal.argmin(-1)
    shape = d_pal.min(-1) < d_bg
    fraction = float(shape.mean())
    if not shape.any():
        return VideoScore(None, None, 0.0, fraction)
    votes = np.bincount(nearest[shape], minlength=len(_PALETTE_NAMES))
    k = int(votes.argmax())
    mine = shape & (nearest == k)

    def centroid(mask: np.ndarray) -> np.ndarray | None:
        ys, xs = np.nonzero(mask)
        return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])

    first, last = centroid(mine[0]), centroid(mine[-1])
    if first is None or last is None:
        return VideoScore(_PALETTE_NAMES[k], None, 0.0, fraction)
    dx, dy = last - first
    motion = float(np.hypot(dx, dy))
    direction = None
    if motion >= min_motion_px:
        step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(name for name, v in DIRECTIONS.items() if v == step)
    return VideoScore(_PALETTE_NAMES[k], direction, motion, fraction)


def prompt_accuracy(videos, truths) -> dict[str, float]:
    """Colour and direction accuracy of ``videos`` (uint8 (T, H, W, 3) each) against ``truths`` (dicts or
    :class:`ShapeSpec` with ``color`` and ``direction``): ``{"color": .., "direction": .., "n": ..}``."""
    videos, truths = list(videos), list(truths)
    if len(videos) != len(truths) or not videos:
        raise ValueError(f"need as many truths as videos, at least one (got {len(videos)} / {len(truths)})")
    hits = {"color": 0, "direction": 0}
    for video, truth in zip(videos, truths, strict=True):
        s = score_video(video)
        get = truth.get if isinstance(truth, dict) else lambda k, t=truth: getattr(t, k)
        hits["color"] += s.color == get("color")
        hits["direction"] += s.direction == get("direction")
    n = len(videos)
    return {"color": hits["color"] / n, "direction": hits["direction"] / n, "n": n}
