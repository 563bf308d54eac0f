"""Precomputed VAE latents (``preprocess.latents: true``) against online VAE encoding, side by side in one run.

Both arms train the same inflated SD-shaped UNet (tests/sd_tiny.py's layout: 3 blocks, cross-attention, 4
latent channels) on the same batch with the same optimizer, loss and prior; they alternate step by step so
machine load hits both alike:

- **online**: the clip row's uint8 frames -> float [-1, 1] -> VAE encode (no grad) -> loss, backward, step
  (what train does when the clips have no latents column);
- **latents**: the clip row's float16 latents bytes -> float32 (`pyoco.clips.latents_tensor`) -> loss,
  backward, step (what train does with a latents column: no VAE in the loop).

Also the bytes stored per clip row: raw frames (T x H x W x 3 uint8) against raw latents (C x T x h x w
float16), and the zstd parquet files preprocess writes (`pyoco.clips.write_clip_table`) with frames only
against latents only (``keep_frames: false``), on rendered synth clips with noisy backgrounds (pyoco.synth).

    PYTHONPATH=. .venv/bin/python bench/latents.py [--frames 16] [--size 128] [--batch 2] [--steps 6]

Goals: latents steps >= 1.5x faster, clip rows >= 10x smaller. Prints the machine and its load average:
on a shared machine the load says how far the timings can be trusted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="Pixel size (a multiple of 32: VAE 8 x UNet 4).")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="Timed steps per arm (after 1 warm-up each).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from pyoco import clips as C
    from pyoco import synth
    from pyoco.diffusion import DiffusionLoss, make_scheduler_config
    from pyoco.model import VideoDenoiser, inflate
    from pyoco.noise import make_prior
    from pyoco.vae import encode_frames
    from tests.sd_tiny import CLIP_DIM, MAX_LENGTH, build_unet, build_vae, sd_scheduler_config

    torch.set_num_threads(args.threads)
    b, t, size = args.batch, args.frames, args.size
    vae = build_vae().requires_grad_(False)
    latent = size // 8
    model = VideoDenoiser(
        inflate(
            build_unet(latent_size=latent), motion_max_seq_length=max(32, t), motion_num_attention_heads=1
        )
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = DiffusionLoss(make_scheduler_config(sd_scheduler_config()), caption_dropout=0.0)
    prior = make_prior("progressive", 1.0)

    # Noisy-background synth clips: flat-colour ones compress ~600x under zstd, which says nothing about
    # real video (sensor noise, texture); a static noisy background is still kinder to zstd than real video.
    all_specs = (synth.make_spec(i, frames=t, size=size) for i in range(1000))
    specs = [s for s in all_specs if s.background == "noisy"][:b]
    frames = np.stack([synth.render(s) for s in specs])  # (B, T, H, W, 3) uint8
    frame_cells = [f.tobytes() for f in frames]
    latents = encode_frames(vae, frames)  # what preprocess stores, (B, C, T, h, w)
    latent_cells = C.latents_array(latents).to_pylist()
    shape = tuple(latents.shape[1:])
    cond = torch.randn(b, MAX_LENGTH, CLIP_DIM)
    mask = torch.ones(b, MAX_LENGTH, dtype=torch.bool)

    def x0_online() -> torch.Tensor:
        x = np.stack([np.frombuffer(c, np.uint8).reshape(t, size, size, 3) for c in frame_cells])
        return encode_frames(vae, x)

    def x0_latents() -> torch.Tensor:
        return C.latents_tensor(latent_cells, shape)

    def step(make_x0, seed: int) -> float:
        t0 = time.perf_counter()
        x0 = make_x0()
        out = loss_fn(model, x0, cond, mask, prior, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0

    arms = {"online": x0_online, "latents": x0_latents}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(args.steps + 1):  # alternate the arms; the first round is warm-up
        for name, fn in arms.items():
            dt = step(fn, i)
            if i:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}

    # bytes per clip row: raw and as preprocess writes them (zstd parquet), frames-only vs latents-only
    def parquet_bytes(with_frames: bool, with_latents: bool) -> int:
        rows = []
        for i in range(b):
            rows.append(
                {
                    "clip_id": f"{i:024d}",
                    "source": "bench",
                    "key": f"{i:08d}",
                    "clip_index": 0,
                    "start_frame": 0,
                    "num_frames": t,
                    "fps": 8.0,
                    "height": size,
                    "width": size,
                    "frames": frame_cells[i] if with_frames else None,
                    "caption": "bench",
                    C.EMBEDDING: np.zeros((MAX_LENGTH, CLIP_DIM), np.float32),
                    C.MASK: [True] * MAX_LENGTH,
                    "labels": None,
                    "node_id": "bench",
                    **({C.LATENTS: latents[i].numpy()} if with_latents else {}),
                }
            )
        path = ROOT / ".bench-latents.parquet"
        try:
            C.write_clip_table(rows, str(path), vae_identity="sha256:bench" if with_latents else None)
            return path.stat().st_size
        finally:
            path.unlink(missing_ok=True)

    emb_only = parquet_bytes(False, False)
    frames_file = parquet_bytes(True, False) - emb_only
    latents_file = parquet_bytes(False, True) - emb_only
    raw_frames, raw_latents = len(frame_cells[0]), len(latent_cells[0])
    result = {
        "shape": {"frames": [t, size, size, 3], "latents": list(shape), "batch": b},
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "step_speedup": round(med["online"] / med["latents"], 2),
        "row_bytes": {"frames_raw": raw_frames, "latents_raw": raw_latents},
        "row_ratio_raw": round(raw_frames / raw_latents, 1),
        "parquet_bytes_per_row": {"frames": frames_file // b, "latents": latents_file // b},
        "row_ratio_parquet": round(frames_file / max(1, latents_file), 1),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
        },
        "reproduce": "PYTHONPATH=. .venv/bin/python bench/latents.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(result, indent=1))
    print(
        f"latents vs online VAE: step {result['step_speedup']}x faster (goal >= 1.5), rows "
        f"{result['row_ratio_raw']}x smaller raw / {result['row_ratio_parquet']}x as zstd parquet (goal >= 10)"
    )
    return result


if __name__ == "__main__":
    main()
