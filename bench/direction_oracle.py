"""Issue 10: how much the diffusion loss can reward the caption's direction at the highest noise.

At t = 999 the noisy input is pure noise (abar = 2.4e-9), so the best v-prediction is ``-E[x0 | caption]``
and the loss there is ``E||x0 - E[x0 | caption]||^2``. For the synthetic data that mean is known: render
many videos of the caption's shape, colour, direction and speed with fresh start points, sizes and
backgrounds (``pyoco.synth``'s own draw), encoded as the dataset is and decoded into the clip layout by
preprocess's own decoder (``pyoco.video.decode``: frame stride, area resize). This script scores the held-out clips against it, in order and reversed, and against the mean that
knows only shape and colour, and the caption-free mean. Compare the losses with ``by_timestep['999']['ordered']``
(the same units: v ~ -x0 there, unweighted). ``order_gain`` (reversed / ordered - 1) is the ceiling for what
``bench/frame_order.py``'s ``by_timestep['999']`` can show; ``direction_gain`` is how much knowing the
direction lowers the t = 999 loss.

    PYTHONPATH=. .venv/bin/python bench/direction_oracle.py --data demo/out/data [--draws 128]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyoco import clips as C  # noqa: E402
from pyoco import synth  # noqa: E402
from pyoco.config import load_config  # noqa: E402
from pyoco.video import decode  # noqa: E402

RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "bench_image16.yaml"
KEYS = ("shape", "color", "direction", "speed")


def _as_clip(mp4: bytes, start: int, stride: int, num_frames: int, size: int) -> np.ndarray:
    """A synth video's mp4 (as the dataset stores it) -> float (num_frames, size, size, 3) in [-1, 1], decoded
    and resized by preprocess's own decoder from frame ``start``."""
    x = decode(mp4, start_frame=start, num_frames=num_frames, frame_stride=stride, size=size)
    return x.astype(np.float64) / 127.5 - 1.0


def oracle_means(labels: list[dict], cfg, *, draws: int, seed: int = 0) -> dict[tuple, np.ndarray]:
    """E[clip | shape, colour, direction, speed, start frame] by Monte Carlo, for every such tuple in
    ``labels`` (the start frame is the clip's, not the caption's; a one-frame shift at most here)."""
    s, p = cfg.synth, cfg.preprocess
    want = {(*(lab[k] for k in KEYS), lab.get("start_frame", 0)) for lab in labels}
    starts = sorted({w[-1] for w in want})
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    rng = random.Random(seed)
    index = 0
    while any(counts.get(w, 0) < draws for w in want):
        index += 1
        spec = synth._draw_shot(rng, index=index, seed=10_000 + seed, frames=s.frames, size=s.size, fps=8)
        video = None
        for start in starts:
            key = (*(getattr(spec, k) for k in KEYS), start)
            if key not in want or counts.get(key, 0) >= draws:
                continue
            video = synth.encode_sample(spec)["mp4"] if video is None else video
            sums[key] = sums.get(key, 0.0) + _as_clip(video, start, p.frame_stride, p.num_frames, p.size)
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in want}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="preprocess output (clips/val with synth labels)")
    ap.add_argument("--config", default=str(RECIPE_CONFIG))
    ap.add_argument("--clips", type=int, help="only the first N val clips (frame_order.py probes 16)")
    ap.add_argument("--draws", type=int, default=128, help="rendered videos per caption for each mean")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)

    table = C.read_clips(args.data, "val").sort_by("clip_id")
    labels = C.labels_of(table)
    keep = [
        i for i, lab in enumerate(labels) if all(lab.get(k) for k in KEYS) and lab.get("speed") != "static"
    ]
    rows = table.select(["frames", "num_frames", "height", "width", "start_frame"]).to_pylist()
    real = np.stack([C.frames_array(rows[i]) for i in keep]).astype(np.float64) / 127.5 - 1.0
    labels = [{**labels[i], "start_frame": int(rows[i]["start_frame"])} for i in keep]
    if args.clips:
        real, labels = real[: args.clips], labels[: args.clips]

    means = oracle_means(labels, cfg, draws=args.draws)
    by_sc: dict[tuple, list[np.ndarray]] = {}
    for key, m in means.items():
        by_sc.setdefault((*key[:2], key[-1]), []).append(m)
    # E[clip | shape, colour]: directions and speeds are drawn uniformly, so average over all four x two
    # (every combination is rendered when it is missing from the val captions).
    blind = {}
    for sc in by_sc:
        full = oracle_means(
            [
                {**dict(zip(KEYS, (*sc[:2], d, v), strict=True)), "start_frame": sc[2]}
                for d in synth.DIRECTIONS
                for v in synth.SPEEDS
            ],
            cfg,
            draws=args.draws,
            seed=1,
        )
        blind[sc] = np.mean(list(full.values()), axis=0)

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    # E[clip] (no caption): the shape-and-colour means averaged per start frame (uniform draws of both).
    uncond = {
        st: np.mean([m for sc, m in blind.items() if sc[2] == st], axis=0) for st in {k[2] for k in blind}
    }
    ordered, reversed_, blind_loss, uncond_loss, fidelity = [], [], [], [], []
    for x, lab in zip(real, labels, strict=True):
        m = means[(*(lab[k] for k in KEYS), lab["start_frame"])]
        ordered.append(mse(x, m))
        reversed_.append(mse(x[::-1], m))
        blind_loss.append(mse(x, blind[(lab["shape"], lab["color"], lab["start_frame"])]))
        uncond_loss.append(mse(x, uncond[lab["start_frame"]]))
    # How closely the renderer reproduces a stored clip (codec and resize differences), from its own labels,
    # on the plain-background clips (a noisy background's pixels come from the video's own noise stream).
    plain = [(x, lab) for x, lab in zip(real, labels, strict=True) if lab.get("background") == "plain"]
    for x, lab in plain[:8]:
        bg = tuple(int(v) for v in np.round((np.median(x[0].reshape(-1, 3), axis=0) + 1) * 127.5))
        spec = synth.ShapeSpec(
            index=0, seed=0, shape=lab["shape"], color=lab["color"], direction=lab["direction"],
            speed=lab["speed"], speed_px_per_frame=lab["speed_px_per_frame"], background="plain",
            background_rgb=bg,
            radius_px=lab["radius_px"], start_xy=tuple(lab["start_xy"]), frames=lab["frames"],
            size=cfg.synth.size, fps=8, caption="",
        )  # fmt: skip
        fidelity.append(
            float(
                np.abs(
                    x
                    - _as_clip(
                        synth.encode_sample(spec)["mp4"],
                        lab["start_frame"],
                        cfg.preprocess.frame_stride,
                        len(x),
                        x.shape[1],
                    )
                ).mean()
            )
        )
    o, r, b = np.mean(ordered), np.mean(reversed_), np.mean(blind_loss)
    report = {
        "val_clips": len(real),
        "draws_per_caption": args.draws,
        "loss_ordered": round(float(o), 5),
        "loss_reversed": round(float(r), 5),
        "loss_without_direction": round(float(b), 5),
        "loss_without_caption": round(float(np.mean(uncond_loss)), 5),
        "loss_of_zero": round(float((real**2).mean()), 5),
        "order_gain": round(float(r / o - 1), 4),
        "direction_gain": round(float(b / o - 1), 4),
        "order_gain_fast": round(
            float(
                np.mean([a for a, lab in zip(reversed_, labels, strict=True) if lab["speed"] == "fast"])
                / np.mean([a for a, lab in zip(ordered, labels, strict=True) if lab["speed"] == "fast"])
                - 1
            ),
            4,
        ),
        "render_vs_stored_mean_abs": round(float(np.mean(fidelity)), 4),  # in [-1, 1] units
        "stored_clip_mean_abs": round(float(np.abs(real).mean()), 4),
        "reproduce": "PYTHONPATH=. .venv/bin/python bench/direction_oracle.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
