"""Does a model draw the prompted shape? Colour and direction accuracy by pixels, against synth ground truth.

The prompts are the captions of held-out synth videos (``--seed`` other than the training data's), so their
colour and direction are known exactly. Each generated video is read by `pyoco.synth.score_video`: the
palette colour most non-background pixels are nearest to, and the axis/sign of that colour's centroid motion
from the first to the last frame. The same scorer on the real clips (mp4-encoded, decoded and resized like
preprocess does) is printed first: it must be ~1.0 on both, or the scorer, not the model, is wrong.

    PYTHONPATH=. .venv/bin/python bench/demo_quality.py --model demo/out/model --videos 64 --seed 7 \
        --png docs/demo_champion.png

Prints one JSON line: ``{"real": {...}, "generated": {...}, "n": .., "sample_s": ..}``. Chance is 1/7 for
colour and 1/4 for direction.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch


def real_clips(specs, *, num_frames: int, size: int) -> list[np.ndarray]:
    """The clips preprocess would make of these synth videos: H.264 at the synth size, then area-resized."""
    from pyoco import synth
    from pyoco.video import decode_clips

    out = []
    for spec in specs:
        mp4 = synth.encode_sample(spec)["mp4"]
        out.append(decode_clips(io.BytesIO(mp4), num_frames=num_frames, size=size, key=spec.key)[0].frames)
    return out


def frame_strip(rows: list[list[np.ndarray]], *, scale: int = 4, gap: int = 2) -> np.ndarray:
    """Rows of videos (each uint8 (T, H, W, 3)) side by side, frames left to right, upscaled by ``scale``."""
    tiles = []
    for row in rows:
        parts = []
        for video in row:
            frames = [np.kron(f, np.ones((scale, scale, 1), np.uint8)) for f in video]
            parts.append(np.concatenate(frames, axis=1))
            parts.append(np.full((parts[-1].shape[0], gap * 4, 3), 255, np.uint8))
        tiles.append(np.concatenate(parts[:-1], axis=1))
        tiles.append(np.full((gap, tiles[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="A model package (what training exports).")
    ap.add_argument("--videos", type=int, default=64, help="Held-out synth videos (= prompts).")
    ap.add_argument("--seed", type=int, default=7, help="Synth seed of the held-out videos.")
    ap.add_argument("--synth-size", type=int, default=32, help="Synth frame size before resizing.")
    ap.add_argument("--synth-frames", type=int, default=16)
    ap.add_argument(
        "--frames", type=int, help="Frames per video (default: the package's; 8 for image models)."
    )
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps.")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument(
        "--eta", type=float, default=0.0, help="DDIM eta (0: deterministic, as the demo samples)."
    )
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--scheduler", action="append", default=[], help="Override a scheduler_config key: KEY=JSON."
    )
    ap.add_argument("--png", help="Write a frame strip: real clip | generated, one row per prompt.")
    ap.add_argument("--png-rows", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pyoco import synth
    from pyoco.package import load_package
    from pyoco.sampling import generate

    pkg = load_package(args.model)
    size = pkg.info.height
    frames = args.frames or (pkg.info.num_frames if pkg.info.num_frames > 1 else 8)
    specs = [
        synth.make_spec(i, seed=args.seed, frames=args.synth_frames, size=args.synth_size)
        for i in range(args.videos)
    ]
    real = real_clips(specs, num_frames=frames, size=size)
    real_acc = synth.prompt_accuracy(real, specs)

    for item in args.scheduler:
        key, _, value = item.partition("=")
        pkg.scheduler_config[key] = json.loads(value)
    encoder = pkg.text_encoder()
    prior = pkg.prior()
    t0 = time.perf_counter()
    videos = []
    for start in range(0, len(specs), args.batch):
        chunk = specs[start : start + args.batch]
        out = generate(
            pkg.denoiser,
            encoder,
            [s.caption for s in chunk],
            prior=prior,
            num_frames=frames,
            height=size,
            width=size,
            steps=args.steps,
            guidance=args.guidance,
            eta=args.eta,
            seed=args.sample_seed + start,
            scheduler_config=pkg.scheduler_config,
        )
        videos.extend(v.numpy() for v in out)
    sample_s = time.perf_counter() - t0
    gen_acc = synth.prompt_accuracy(videos, specs)
    result = {
        "model": str(args.model),
        "n": len(specs),
        "real": real_acc,
        "generated": gen_acc,
        "sample_s": round(sample_s, 1),
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        "noise": pkg.info.noise,
        "scheduler_overrides": args.scheduler,
    }
    if args.png:
        from PIL import Image

        rows = [[real[i], videos[i]] for i in range(min(args.png_rows, len(specs)))]
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame_strip(rows)).save(args.png, optimize=True)
        result["png"] = args.png
        result["png_prompts"] = [specs[i].caption for i in range(len(rows))]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
