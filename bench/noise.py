"""Cost of drawing PYoCo noise against a bare torch.randn of the same size, on CPU.

    python bench/noise.py [--shape 8 4 16 64 64] [--repeats 30] [--threads N]

Runs are interleaved (randn, mixed, progressive, randn, ...) so machine noise hits all three alike;
medians are reported. Goal: ratio <= 1.15 for both kinds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pyoco.noise import make_prior  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=5, default=[8, 4, 16, 64, 64])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.repeats < 20:
        ap.error("--repeats must be >= 20")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    gen = torch.Generator().manual_seed(0)
    candidates = {
        "randn": lambda: torch.randn(shape, generator=gen),
        "mixed": lambda p=make_prior("mixed", args.alpha): p.sample(shape, generator=gen),
        "progressive": lambda p=make_prior("progressive", args.alpha): p.sample(shape, generator=gen),
    }
    for fn in candidates.values():  # warm-up: allocator, thread pool
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | {os.cpu_count()} cores | "
        f"torch {torch.__version__} | threads {torch.get_num_threads()}"
    )
    print(f"shape (B, C, T, H, W) = {shape}, alpha = {args.alpha}, {args.repeats} interleaved repeats")
    for name, t in med.items():
        print(f"  {name:<12} median {t * 1e3:8.2f} ms")
    for name in ("mixed", "progressive"):
        ratio = med[name] / med["randn"]
        verdict = "ok" if ratio <= 1.15 else "ABOVE GOAL"
        print(f"ratio {name}/randn = {ratio:.3f}  (goal <= 1.15: {verdict})")
    print("reproduce: python bench/noise.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
