"""Issue 10: two bench-only variants of ``bench/frame_order.py``, for the README's re-measured rows.

    PYTHONPATH=. .venv/bin/python bench/frame_order_variants.py --motion-weight 20 -- --out DIR --fit train \
        --layers all --steps 800 --repeats 2
    PYTHONPATH=. .venv/bin/python bench/frame_order_variants.py --direction-token -- --out DIR --fit train \
        --layers all --steps 1000 --repeats 2

- ``--motion-weight L``: during the fit (not the probe), each pixel's squared error is weighted by
  ``1 + L * m``, where ``m`` is the clip's per-pixel motion ``mean_c |x0 - mean_T x0|`` divided by its maximum
  in the clip; each clip's loss is then divided by its mean weight. It asks whether the loss's small share
  of moving pixels (a shape of ~12 of 256 pixels) is why the fits do not learn the motion.
- ``--direction-token``: every caption (train and val, so also the sampling prompts) gets an explicit
  direction token, a fixed random vector per direction at the token states' mean norm, written into its
  first padded slot (mask set). It asks whether the text encoder's contextual states are why the direction
  is not learned. The null caption is left as it is.

Everything after ``--`` goes to ``bench/frame_order.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ablation as A  # noqa: E402
import frame_order as F  # noqa: E402

DIRECTIONS = ("down", "left", "right", "up")


def motion_weighted(lam: float) -> None:
    """Patch ``DiffusionLoss.__call__`` to weight moving pixels, for the duration of ``A.finetune`` only."""
    from pyoco import diffusion as D

    active = {"on": False}
    plain = D.DiffusionLoss.__call__

    def call(self, model, x0, cond, cond_mask, prior, *, generator=None, null_cond=None, null_mask=None,
             timesteps=None):  # fmt: skip
        kw = {"generator": generator, "null_cond": null_cond, "null_mask": null_mask, "timesteps": timesteps}
        if not active["on"]:
            return plain(self, model, x0, cond, cond_mask, prior, **kw)
        # the same draws, in the same order, as DiffusionLoss.__call__
        gen_device = generator.device if generator is not None else x0.device
        eps = prior.sample(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        if timesteps is None:
            timesteps = self.sample_timesteps(x0.shape[0], generator, x0.device)
        timesteps = timesteps.to(x0.device).long()
        cond, cond_mask = self.drop_captions(cond, cond_mask, null_cond, null_mask, generator)
        x_t, target = self.noisy(x0, eps, timesteps)
        pred = model(x_t, timesteps, cond, cond_mask)
        m = (x0 - x0.mean(dim=2, keepdim=True)).abs().mean(dim=1, keepdim=True)  # (B, 1, T, H, W)
        w = 1.0 + lam * m / m.amax(dim=(2, 3, 4), keepdim=True).clamp(min=1e-3)
        per_clip = ((pred.float() - target.float()).pow(2) * w).mean(dim=(1, 2, 3, 4)) / w.mean(
            dim=(1, 2, 3, 4)
        )
        weighted = per_clip * self.weights(timesteps)
        return D.LossOutput(loss=weighted.mean(), per_sample=weighted.detach(), timesteps=timesteps)

    D.DiffusionLoss.__call__ = call
    fit = A.finetune

    def finetune(*args, **kwargs):
        active["on"] = True
        try:
            return fit(*args, **kwargs)
        finally:
            active["on"] = False

    A.finetune = finetune


def direction_tokens(seed: int = 123) -> None:
    """Patch the train tensors and the eval clips to carry an explicit direction token."""
    import pipelines.evaluate.metrics as M
    from pyoco import clips as C

    rng = np.random.default_rng(seed)
    vectors: list[np.ndarray] = []

    def mark(cond, mask, labels):
        cond, mask = np.array(cond, copy=True), np.array(mask, dtype=bool, copy=True)
        if not vectors:
            norm = float(np.linalg.norm(cond[mask], axis=-1).mean())
            v = rng.standard_normal((len(DIRECTIONS), cond.shape[-1])).astype(np.float32)
            vectors.append(v * norm / np.linalg.norm(v, axis=-1, keepdims=True))
        for i, lab in enumerate(labels):
            if lab.get("direction") not in DIRECTIONS:
                continue
            free = np.flatnonzero(~mask[i])
            j = int(free[0]) if len(free) else cond.shape[1] - 1
            cond[i, j], mask[i, j] = vectors[0][DIRECTIONS.index(lab["direction"])], True
        return cond, mask

    train_tensors, eval_clips = A.load_train_tensors, M.load_eval_clips

    def load_train(data):
        frames, cond, mask = train_tensors(data)
        cond, mask = mark(cond, mask, C.labels_of(C.read_clips(data, "train").sort_by("clip_id")))
        return frames, cond, mask

    def load_eval(*args, **kwargs):
        clips = eval_clips(*args, **kwargs)
        cond, mask = mark(clips.cond, clips.mask, clips.labels)
        return dataclasses.replace(clips, cond=cond, mask=mask)

    A.load_train_tensors = load_train
    M.load_eval_clips = load_eval


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--motion-weight", type=float, help="L in the per-pixel weight 1 + L * motion")
    ap.add_argument("--direction-token", action="store_true", help="an explicit direction token per caption")
    args = ap.parse_args(ours)
    if args.motion_weight is None and not args.direction_token:
        ap.error("pick --motion-weight L and/or --direction-token")
    if args.motion_weight is not None:
        motion_weighted(args.motion_weight)
    if args.direction_token:
        direction_tokens()
    return F.main(rest)


if __name__ == "__main__":
    main()
