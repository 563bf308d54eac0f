"""Shot cuts, cut-free clip windows, motion and jitter of decoded frames (pure numpy).

The PYoCo prior (Ge et al. 2023) assumes the frames of a clip are strongly correlated; a shot cut inside a
clip breaks that, and a static clip teaches the video model nothing about motion. Preprocess uses these on
frames ``uint8 (T, H, W, 3)`` (any size; clip frames are small):

    cuts = detect_cuts(frames)                      # [i, ...]: a new shot starts at frame i
    windows = clip_windows(len(frames), cuts, clip_len=16, stride=2)   # [(start, stop), ...] within shots
    motion_score(clip) < STATIC_MOTION              # the clip is static
    jitter_score(clip) > JITTER_PX                  # the camera shakes

Scene-change score: the total-variation distance between the joint RGB histograms (``bins`` levels per
channel) of consecutive frames, in [0, 1]: 0 for frames with the same colour distribution, 1 for frames
sharing no colour bin. An object moving over a background keeps its pixel counts, so motion scores near 0;
a hard cut to another scene changes most of the histogram. A transition is a cut when its score exceeds both
``min_score`` and ``factor`` times the median score of its neighbourhood (``window`` transitions each side),
so that a video whose every step changes a lot (noise, flashing) needs a proportionally larger jump.
"""

from __future__ import annotations

import numpy as np

# A clip whose motion_score is below this is `static`. Measured on synth videos through H.264 (crf 18) and
# PyAV, 32 and 64 px, every 2nd frame: moving shapes >= 2.6e-3 (9x more), still ones <= 3.5e-5 (9x less).
STATIC_MOTION = 3e-4
# A clip whose jitter_score is above this (px per frame step, per frame step) shakes: its global motion
# changes by more than 2 px from one step to the next, on average.
JITTER_PX = 2.0


def _as_frames(frames) -> np.ndarray:
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {x.dtype} {x.shape}")
    return x


def cut_scores(frames, *, bins: int = 8, max_side: int = 64) -> np.ndarray:
    """``(T - 1,)`` float64: the histogram distance (see the module doc) between frames t and t + 1.

    Frames are subsampled by an integer stride to at most ``max_side`` px per side first (a histogram does
    not need every pixel)."""
    x = _as_frames(frames)
    t, h, w, _ = x.shape
    if t < 2:
        return np.zeros(0)
    step = max(1, -(-max(h, w) // max_side))
    q = (x[:, ::step, ::step].astype(np.int32) * bins) >> 8  # (T, h', w', 3) levels in [0, bins)
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]  # joint bin per pixel
    code = code.reshape(t, -1) + (np.arange(t) * bins**3)[:, None]  # one histogram per frame
    hist = np.bincount(code.ravel(), minlength=t * bins**3).reshape(t, bins**3)
    hist = hist / hist.sum(1, keepdims=True)
    return 0.5 * np.abs(np.diff(hist, axis=0)).sum(1)


def detect_cuts(
    frames,
    *,
    min_score: float = 0.3,
    factor: float = 3.0,
    window: int = 8,
    bins: int = 8,
) -> list[int]:
    """Indices ``i`` (1 <= i < T) where a new shot starts (the cut lies between frames i - 1 and i).

    See the module doc for the score and the adaptive threshold."""
    s = cut_scores(frames, bins=bins)
    if len(s) == 0:
        return []
    cuts = []
    for j, score in enumerate(s):
        if score <= min_score:
            continue
        lo, hi = max(0, j - window), min(len(s), j + window + 1)
        around = np.concatenate([s[lo:j], s[j + 1 : hi]])
        local = float(np.median(around)) if len(around) else 0.0
        if score > factor * local:
            cuts.append(j + 1)
    return cuts


def shot_ranges(num_frames: int, cuts: list[int]) -> list[tuple[int, int]]:
    """The shots ``[(start, stop), ...]`` (stop exclusive) that ``cuts`` divide ``num_frames`` frames into."""
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < num_frames), num_frames]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def clip_span(clip_len: int, stride: float = 1) -> int:
    """Source frames a clip of ``clip_len`` frames taken every ``stride`` frames covers (as
    :func:`pyoco.video.plan_clips` places them: offsets ``round(i * stride)``)."""
    if clip_len < 1 or stride <= 0:
        raise ValueError(f"need clip_len >= 1 and stride > 0 (got {clip_len}, {stride})")
    return round((clip_len - 1) * stride) + 1


def clip_windows(num_frames: int, cuts: list[int], clip_len: int, stride: float = 1) -> list[tuple[int, int]]:
    """Non-overlapping clip windows ``[(start, stop), ...]`` (source frames, stop exclusive, ``stop - start
    == clip_span(clip_len, stride)``) that never contain a cut: each shot is tiled from its first frame, and
    the remainder shorter than a clip is left out. A shot shorter than one clip gives none."""
    span = clip_span(clip_len, stride)
    out = []
    for a, b in shot_ranges(num_frames, cuts):
        out += [(s, s + span) for s in range(a, b - span + 1, span)]
    return out


def motion_score(frames, *, noise_floor: int = 6) -> float:
    """Mean absolute difference between consecutive frames, over every pixel and channel, as a fraction of
    the 8-bit range: in [0, 1] per frame step. Differences of at most ``noise_floor`` levels count as 0: codec
    noise on a textured still background is that small, while motion edges differ by tens of levels.

    0: frozen. Synth shapes (5 % of the frame) moving at their slowest: ~2.5e-3. It depends on the clip's
    frame step (its stride or fps), not much on its size."""
    x = _as_frames(frames)
    if len(x) < 2:
        return 0.0
    d = np.abs(np.diff(x.astype(np.int16), axis=0))
    d[d <= noise_floor] = 0
    return float(d.mean() / 255.0)


def global_shifts(frames) -> np.ndarray:
    """``(T - 1, 2)`` integer ``(dx, dy)`` px: the translation from frame t to t + 1 that best aligns their
    luma, by phase correlation (exact for circular shifts, the dominant motion otherwise)."""
    x = _as_frames(frames).astype(np.float32)
    if len(x) < 2:
        return np.zeros((0, 2), np.int64)
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)  # (T, H, W)
    luma -= luma.mean(axis=(1, 2), keepdims=True)
    f = np.fft.rfft2(luma)
    cross = f[1:] * np.conj(f[:-1])
    r = np.fft.irfft2(cross / (np.abs(cross) + 1e-9), s=luma.shape[1:])  # (T-1, H, W)
    h, w = luma.shape[1:]
    peak = r.reshape(len(r), -1).argmax(1)
    dy, dx = np.divmod(peak, w)
    dy = np.where(dy > h // 2, dy - h, dy)
    dx = np.where(dx > w // 2, dx - w, dx)
    return np.stack([dx, dy], axis=1)


def jitter_score(frames) -> float:
    """Camera shake: the RMS change of the global shift (:func:`global_shifts`) from one frame step to the
    next, in px per step per step (0 for a still camera or a steady pan)."""
    v = global_shifts(frames).astype(np.float64)
    if len(v) < 2:
        return 0.0
    return float(np.sqrt((np.diff(v, axis=0) ** 2).sum(1).mean()))
