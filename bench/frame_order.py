"""Issue 10 diagnostic: can the inflated image model memorise the clips it is finetuned on, and does it use
frame order at all? "The demo" below is ``pipelines/configs/bench_image16.yaml`` (``--config``), the demo's
image -> video recipe until issue 10; ``make demo`` now finetunes the shipped video model instead.

    PYTHONPATH=. .venv/bin/python bench/frame_order.py --out /tmp/frame-order              # 600 steps, ~8 min
    PYTHONPATH=. .venv/bin/python bench/frame_order.py --out /tmp/frame-order --steps 1800

It builds the demo's data and evaluator once (``bench/ablation.py``'s ``prepare_data``), finetunes the demo's
inflated model with the ablation's ``finetune`` loop *on the held-out clips themselves* (``--fit val``, the
default: a memorisation test; ``--fit train`` is the demo's real setting) and then measures:

- **frame-order probe.** The diffusion loss on 16 of the fitted clips, averaged over 8 fixed noise draws,
  with the frames in order, reversed, shuffled, and with every motion module switched off (``proj_out``
  zeroed, which makes each one the identity). A model that has learned motion loses more on reversed or
  shuffled clips than on ordered ones; one that only shares content across frames (background, colour)
  scores them alike, and loses only when its motion modules are off.
- **prompt accuracy** of samples drawn for the fitted clips' own captions (learned evaluator, 20 DDIM steps,
  the demo's guidance), against the evaluator's label of the real clip, and a frame strip
  (``--out``/strip.png: real clip | sample, one row per clip).

``--lever caption-motion|frame-bias`` attaches one of ``bench/levers.py``'s experimental caption/frame paths
before finetuning, and ``--timestep-power p`` trains on t with density ~ t^(p-1) (more high-noise steps).
The probe also reports the order gain at single timesteps (``by_timestep``), up to t = 999 (pure noise).

Losses here are all under one prior, so they compare with each other (never across priors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ablation as A  # noqa: E402  (bench/ is not a package)
import levers  # noqa: E402
from demo_quality import frame_strip  # noqa: E402

PROBE_CLIPS = 16
PROBE_DRAWS = 8
PROBE_TIMESTEPS = (500, 900, 970, 999)  # per-t probe: where (if anywhere) frame order starts to matter


@contextlib.contextmanager
def motion_off(model):
    """Every AnimateDiff motion module (and every lever branch after one) made the identity (its
    ``proj_out`` zeroed), restored on exit."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    saved = []
    for m in model.modules():
        if isinstance(m, AnimateDiffTransformer3D | levers.MotionBranch):
            saved.append((m.proj_out, {k: v.clone() for k, v in m.proj_out.state_dict().items()}))
            for p in m.proj_out.parameters():
                p.data.zero_()
    if not saved:
        raise SystemExit("frame_order: the model has no motion modules")
    try:
        yield len(saved)
    finally:
        for module, state in saved:
            module.load_state_dict(state)


def probe(model, loss_fn, prior, data, *, seed: int) -> dict:
    """Mean loss over ``PROBE_DRAWS`` fixed noise draws on the first ``PROBE_CLIPS`` clips of ``data``."""
    frames, cond, mask = data
    x0 = torch.from_numpy(frames[:PROBE_CLIPS]).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
    c = torch.from_numpy(np.asarray(cond[:PROBE_CLIPS], np.float32))
    m = torch.from_numpy(np.asarray(mask[:PROBE_CLIPS]))
    t = x0.shape[2]
    shuffle = torch.randperm(t, generator=torch.Generator().manual_seed(seed))

    def loss(x, draws: int = PROBE_DRAWS) -> float:
        with torch.no_grad():
            values = [
                float(loss_fn(model, x, c, m, prior, generator=torch.Generator().manual_seed(seed + d)).loss)
                for d in range(draws)
            ]
        return float(np.mean(values))

    ordered, reversed_ = loss(x0), loss(x0.flip(2))
    with motion_off(model) as n_modules:
        off = loss(x0)
    # The same at one timestep each: at t = 999 the frames are pure noise, so a model that draws the
    # caption's motion must lose on reversed clips there (its x0 guess moves the caption's way).
    by_t = {}
    sample_timesteps = type(loss_fn).sample_timesteps
    try:
        for t_fixed in PROBE_TIMESTEPS:
            type(loss_fn).sample_timesteps = lambda self, b, g, d, t_fixed=t_fixed: torch.full(
                (b,), t_fixed, dtype=torch.long, device=d
            )
            o, r = loss(x0, 4), loss(x0.flip(2), 4)
            by_t[str(t_fixed)] = {"ordered": o, "order_gain": r / o - 1.0}
    finally:
        type(loss_fn).sample_timesteps = sample_timesteps
    return {
        "ordered": ordered,
        "reversed": reversed_,
        "shuffled": loss(x0[:, :, shuffle]),
        "motion_off": off,
        "motion_modules": n_modules,
        "order_gain": reversed_ / ordered - 1.0,  # > 0: the model prefers real frame order
        "motion_gain": off / ordered - 1.0,  # > 0: the motion modules help at all
        "by_timestep": by_t,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Folder for data, evaluator, frame_order.json, strip.png.")
    ap.add_argument("--config", default=str(A.RECIPE_CONFIG))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--layers", choices=("all", "temporal"), default="all")
    ap.add_argument("--prior", default="progressive", help="iid | mixed | progressive")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--lr", type=float, help="default: the config's train.lr")
    ap.add_argument("--fit", choices=("val", "train"), default="val", help="clips to finetune on")
    ap.add_argument("--lever", choices=levers.LEVERS, default="none", help="see bench/levers.py")
    ap.add_argument(
        "--timestep-power", type=float, default=1.0, help="train t with density ~ t^(p-1); 1 = uniform"
    )
    ap.add_argument(
        "--guidance", type=float, nargs="+", help="guidance scales to sample with (default: the config's)"
    )
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the samples (0: deterministic)")
    ap.add_argument("--sample-steps", type=int, help="DDIM steps of the samples (default: the recipe's, 20)")
    ap.add_argument("--repeats", type=int, default=1, help="videos per val prompt (distinct noise each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pipelines.evaluate.metrics import generate_for_prompts, load_eval_clips
    from pipelines.train.engine import build_denoiser
    from pyoco.config import ModelConfig, load_config
    from pyoco.diffusion import DiffusionLoss
    from pyoco.evaluator import load_evaluator
    from pyoco.noise import make_prior
    from pyoco.package import ModelPackage, PackageInfo
    from pyoco.text import load_text_encoder

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, evaluator, _ = A.prepare_data(
        cfg, out, videos=cfg.synth.videos, evaluator_steps=cfg.evaluator.steps
    )
    recipe = A.demo_recipe(cfg, steps=args.steps, train_layers=args.layers, lr=args.lr)
    model, sched0 = build_denoiser(
        ModelConfig(
            pretrained=recipe.pretrained,
            motion_num_attention_heads=recipe.motion_num_attention_heads,
            train_layers=args.layers,
            seed=args.seed,
        ),
        image_pretrain=False,
    )
    added = levers.attach(model, args.lever)
    scheduler_config = A.arm_scheduler_config(sched0, recipe, trained=True)
    clips = load_eval_clips(data, None, embed_dim=int(model.config.cross_attention_dim))
    text_spec = {"kind": "minilm", "max_length": int(clips.cond.shape[1])}
    prior = make_prior(args.prior, args.alpha)
    val = (clips.frames, clips.cond.astype(np.float32), clips.mask)
    fit = val if args.fit == "val" else A.load_train_tensors(data)
    t_fit = time.perf_counter()
    with levers.power_timesteps(DiffusionLoss, args.timestep_power):
        losses = A.finetune(
            model,
            scheduler_config,
            recipe,
            prior,
            fit,
            seed=args.seed,
            text_encoder=load_text_encoder(text_spec),
        )
    t_fit = time.perf_counter() - t_fit
    loss_fn = DiffusionLoss(scheduler_config, prediction_type=recipe.prediction_type, caption_dropout=0.0)
    probes = {"fitted": probe(model, loss_fn, prior, fit, seed=100)}
    if args.fit == "train":
        probes["val"] = probe(model, loss_fn, prior, val, seed=100)

    package = ModelPackage(
        model,
        scheduler_config,
        PackageInfo(
            text_encoder=text_spec, height=int(clips.frames.shape[2]), width=int(clips.frames.shape[3])
        ),
    )
    n = len(clips.frames)
    ev = load_evaluator(evaluator)
    _, real = ev.run(clips.frames)
    by_guidance = {}
    for g in args.guidance or [recipe.guidance]:
        videos = generate_for_prompts(
            package,
            clips,
            prior,
            num_videos=n * args.repeats,
            steps=args.sample_steps or recipe.sample_steps,
            guidance=g,
            seed=args.seed,
            eta=args.eta,
        )
        _, probs = ev.run(videos)
        src = np.arange(len(videos)) % n  # video i was prompted with val clip i mod n
        by_guidance[g] = {
            k: float((probs[k].argmax(1) == real[k][src].argmax(1)).mean()) for k in ("color", "direction")
        }
        if len(by_guidance) == 1:
            first = videos
    accuracy = next(iter(by_guidance.values()))
    torch.save(model.state_dict(), out / "model.pt")  # for later sampling sweeps (load after levers.attach)
    from PIL import Image

    Image.fromarray(frame_strip([[clips.frames[i], first[i]] for i in range(min(8, n))])).save(
        out / "strip.png"
    )
    report = {
        "args": vars(args),
        "prompts": n,
        "lever_parameters": added,
        "fit_seconds": round(t_fit, 1),
        "loss_first10": float(np.mean(losses[:10])),
        "loss_last10": float(np.mean(losses[-10:])),
        "probe": probes,
        "prompt_accuracy_on_" + ("fitted" if args.fit == "val" else "val") + "_clips": accuracy,
        "prompt_accuracy_by_guidance": {str(g): a for g, a in by_guidance.items()},
        "videos_per_guidance": n * args.repeats,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": A.machine(),
        "reproduce": "PYTHONPATH=. .venv/bin/python bench/frame_order.py " + shlex.join(sys.argv[1:] or ()),
    }
    (out / "frame_order.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
