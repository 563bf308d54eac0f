"""Step time of ``pyoco train`` (1 Ray Train worker, DeepSpeed ZeRO-1) against a bare PyTorch loop with the same
model, batch, optimizer, loss and thread count, measured side by side in one run:

    bare loop (N steps) -> pyoco train (N steps, Ray Data streaming, DeepSpeed engine, MLflow logging)
    -> bare loop again (N steps)

The pyoco number is the worker's own median step time (data wait + forward/backward + DeepSpeed step, first
steps of the attempt excluded) and its steady-state loop time per step (which also includes per-step MLflow
logging); the bare number is the median over both bare runs. Ratio goal: <= 1.15.

    .venv/bin/python bench/train.py [--steps 20] [--size 32] [--frames 8] [--batch 2] [--threads 1]

EMA and caption dropout are off in both, so the work per step is the same; checkpoints and samples are off
(only the final checkpoint, after the timed steps). Prints the machine (CPU, cores, load average): on a shared
machine the load average says how much the numbers can be trusted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def config(tmp: Path, clips: Path, args) -> dict:
    return {
        "name": "bench",
        "output": str(tmp / "out"),
        "model": {
            "tiny": {"sample_size": args.size, "block_out_channels": [32, 64]},
            "train_layers": "all",
            "text_max_length": 8,
        },
        "noise": {"kind": "progressive", "alpha": 1.0},
        "train": {
            "data": str(clips),
            "num_workers": 1,
            "resources_per_worker": {"CPU": args.threads},
            "zero_stage": 1,
            "batch_size_per_worker": args.batch,
            "lr": 1e-4,
            "lr_schedule": "constant",
            "max_steps": args.steps,
            "grad_clip": 1.0,
            "ema_decay": None,
            "caption_dropout": 0.0,
            "shuffle_buffer": 0,
            "checkpoint_every": 10**6,
            "log_every": 1,
            "sample_every": None,
        },
        "mlflow": {"experiment": "pyoco-bench", "system_metrics": False},
    }


def bare_loop(cfg, batch, steps: int, threads: int) -> list[float]:
    """Plain PyTorch: the same model, AdamW, loss, prior and batch; no Ray, no DeepSpeed."""
    import torch

    from pipelines.train.deepspeed import ADAM_EPS
    from pipelines.train.engine import build_denoiser
    from pyoco.diffusion import DiffusionLoss
    from pyoco.noise import make_prior, rank_generator

    torch.set_num_threads(threads)
    t = cfg.train
    model, sched = build_denoiser(cfg.model, image_pretrain=False)
    model.set_trainable("all")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=t.lr,
        betas=t.betas,
        eps=ADAM_EPS,
        weight_decay=t.weight_decay,
    )
    loss_fn = DiffusionLoss(sched, caption_dropout=0.0)
    prior = make_prior(cfg.noise.kind, cfg.noise.alpha)
    gen = rank_generator(t.seed, 0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = loss_fn(model, batch["x0"], batch["cond"], batch["cond_mask"], prior, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        float(out.loss)
        times.append(time.perf_counter() - t0)
    return times[2:]  # same warm-up exclusion as the pyoco worker


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipelines.train.data import collate_clips, inspect_clips
    from pipelines.train.driver import run_train
    from pyoco.config import parse_config
    from tests.fixtures_train import write_clips

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pyoco-bench-") as tmp_s:
        tmp = Path(tmp_s)
        os.chdir(tmp)  # MLflow's default sqlite:///mlflow.db lands here
        clips = write_clips(
            tmp / "data", num_clips=4 * args.batch, num_frames=args.frames, size=args.size, text_len=8
        )
        cfg = parse_config(config(tmp, clips, args))
        g = inspect_clips(str(clips))
        table = pa.concat_tables([pq.read_table(f) for f in g.files]).slice(0, args.batch)
        batch = collate_clips(table, g)

        bare_a = bare_loop(cfg, batch, args.steps, args.threads)
        ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
        try:
            res = run_train(cfg)
        finally:
            ray.shutdown()
        bare_b = bare_loop(cfg, batch, args.steps, args.threads)

    m = res["metrics"]
    bare = statistics.median(bare_a + bare_b)
    pyoco_step = m["step_time_median_s"]
    pyoco_loop = m.get("loop_time_per_step_s", float("nan"))
    load1 = os.getloadavg()
    print(
        f"machine: {machine()}; torch threads {args.threads}; load average {load0[0]:.1f} -> {load1[0]:.1f}"
    )
    print(
        f"model: tiny UNetMotionModel (32, 64), clips {args.frames}x{args.size}x{args.size}, batch {args.batch}, "
        f"AdamW, fp32, {args.steps} steps each"
    )
    print(
        f"bare PyTorch loop   median step {bare * 1e3:8.1f} ms  (runs before/after: "
        f"{statistics.median(bare_a) * 1e3:.1f} / {statistics.median(bare_b) * 1e3:.1f} ms)"
    )
    print(
        f"pyoco train ZeRO-1  median step {pyoco_step * 1e3:8.1f} ms  (loop incl. logging "
        f"{pyoco_loop * 1e3:.1f} ms/step)"
    )
    print(f"ratio pyoco/bare: {pyoco_step / bare:.3f} (step), {pyoco_loop / bare:.3f} (loop)  [goal <= 1.15]")
    print(
        json.dumps(
            {
                "bare_ms": bare * 1e3,
                "pyoco_step_ms": pyoco_step * 1e3,
                "pyoco_loop_ms": pyoco_loop * 1e3,
                "ratio_step": pyoco_step / bare,
                "ratio_loop": pyoco_loop / bare,
            }
        )
    )


if __name__ == "__main__":
    main()
