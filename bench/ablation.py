"""The paper's claim in miniature: does finetuning an image model into a video model work better with a
correlated noise prior (PYoCo, Ge et al. 2023) than with iid noise? Measured on synth data, where every
prompt's colour and direction are known exactly.

    PYTHONPATH=. .venv/bin/python bench/ablation.py --out /tmp/ablation-out          # default (<= 45 min, 2 CPUs)
    PYTHONPATH=. .venv/bin/python bench/ablation.py --out /tmp/ablation-quick --quick  # smoke run (~1 min)

What it does, all from the image -> video recipe (``pipelines/configs/bench_image16.yaml``, ``make demo``'s until issue 10):

1. **Data, once.** Synth videos -> ``run_preprocess`` (16 px, held-out val split by source key, labels) ->
   ``run_evaluator_train`` (the learned video classifier every arm is scored with).
2. **Arms.** The shipped pretrained image model (``pipelines/assets/tiny-image-16px``) is inflated and
   finetuned under iid, mixed(alpha), progressive(alpha) and progressive at the alpha whose neighbouring-frame
   correlation rho equals mixed(alpha)'s (``pyoco.noise.alpha_to_rho``/``rho_to_alpha``): kinds are compared
   at equal alpha *and* at matched rho. Every arm gets identical data, batch order, steps, learning rate
   schedule, batch size, caption dropout and seeds; k seeds per arm (``--seeds``, default 5). Each
   arm x seed is one Ray task (``num_gpus`` fractional when the cluster has GPUs).
3. **2 x 2 design.** Every finetuned model is sampled with its own prior and with iid; the step-0 (inflated,
   untrained) model is sampled under every prior. That separates the training effect (X trained, iid
   sampled vs iid/iid) from the sampling effect (X trained: own vs iid sampling; step 0: prior vs iid).
4. **Metrics** on the val prompts with the evaluator: prompt accuracy (direction, colour, ...), FVD and
   motion gap (``pyoco.metrics``). Losses are never compared across priors (their irreducible part depends
   on the prior's covariance).
5. **Statistics.** Per-seed paired differences against the iid reference (same seed: same batch order,
   same motion-module init, same sampling noise streams), with a two-level percentile bootstrap (seeds, then
   prompts within each drawn seed; the same prompt draw for both sides of a pair). The minimum detectable
   effect is (z_0.975 + z_0.8) x the bootstrap standard error of the difference (80 % power, 5 % two-sided).
   Learnability gate: if the iid arm's direction accuracy is below 0.5, the comparison is reported as not
   informative at this budget.

Why a plain in-process finetune loop and not ``pyoco train``: the real trainer is Ray Train + DeepSpeed with
checkpointing and MLflow, which costs more per arm than the finetune itself on 2 cores (20+ arms). Each task
instead runs ``finetune`` below, built from the same pieces the trainer uses: ``build_denoiser`` (the same
inflation), ``DiffusionLoss`` with the arm's ``NoisePrior`` and ``rank_generator`` stream, AdamW with the
trainer's betas/eps/weight decay and param groups (``motion_lr_multiplier``), gradient clipping, and its LR schedule (``lr_multiplier``). Sampling is
``generate_for_prompts`` (what ``pyoco evaluate`` uses), under a given prior.

Output in ``--out``: ``ablation.json`` (everything), ``ablation.md`` (the tables), ``ablation.png`` (plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# The pipelines pieces this bench reuses, together so they are easy to follow when the modules move.
from pipelines.context import ensure_ray
from pipelines.evaluate.evaluator import run_evaluator_train
from pipelines.evaluate.metrics import generate_for_prompts, load_eval_clips
from pipelines.preprocess.step import run_preprocess
from pipelines.train.deepspeed import ADAM_EPS, lr_multiplier, param_groups
from pipelines.train.engine import build_denoiser

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIG = ROOT / "pipelines" / "configs" / "bench_image16.yaml"  # the image -> video recipe
GATE_DIRECTION_ACCURACY = 0.5
Z_MDE = 1.959964 + 0.841621  # two-sided 5 % test, 80 % power
REPORTED_LABELS = ("direction", "color")


# ============================================================================================ the settings
@dataclass(frozen=True)
class Arm:
    """A finetuning noise prior. ``name`` is what the tables show."""

    name: str
    kind: str
    alpha: float

    @property
    def rho(self) -> float:
        from pyoco.noise import alpha_to_rho

        return alpha_to_rho(self.alpha, self.kind)

    def prior(self):
        from pyoco.noise import make_prior

        return make_prior(self.kind, self.alpha)


IID = Arm("iid", "iid", 0.0)
STEP0 = "step0"  # the inflated, untrained model


def make_arms(alpha: float, *, matched_rho: bool = True, kinds=("mixed", "progressive")) -> list[Arm]:
    """iid, mixed(alpha), progressive(alpha) and progressive at mixed(alpha)'s rho."""
    from pyoco.noise import alpha_to_rho, rho_to_alpha

    arms = [IID] + [Arm(f"{k}({alpha:g})", k, alpha) for k in kinds]
    if matched_rho and "mixed" in kinds and "progressive" in kinds:
        rho = alpha_to_rho(alpha, "mixed")
        a = rho_to_alpha(rho, "progressive")
        arms.append(Arm(f"progressive({a:.3f})=rho{rho:.3f}", "progressive", a))
    return arms


@dataclass(frozen=True)
class Recipe:
    """Everything an arm's task needs besides its prior and seed (identical for all arms)."""

    pretrained: str
    motion_num_attention_heads: int
    train_layers: str
    steps: int
    batch_size: int  # the demo's global batch (workers x per-worker batch)
    lr: float
    motion_lr_multiplier: float  # the motion modules' lr is lr x this (the trainer's param_groups)
    warmup_steps: int
    lr_schedule: str
    caption_dropout: float
    grad_clip: float | None
    betas: tuple[float, float]
    weight_decay: float
    min_snr_gamma: float | None
    prediction_type: str | None
    num_videos: int
    sample_steps: int
    guidance: float
    threads: int = 1


def demo_recipe(cfg, **overrides) -> Recipe:
    """The recipe config's finetune and sampling settings (``cfg``: its parsed PyocoConfig; by default
    ``bench_image16.yaml``, the demo's recipe until issue 10)."""
    t, m = cfg.train, cfg.model
    pretrained = m.pretrained if Path(m.pretrained).is_absolute() else str((ROOT / m.pretrained).resolve())
    base = Recipe(
        pretrained=pretrained,
        motion_num_attention_heads=m.motion_num_attention_heads,
        train_layers=m.train_layers,
        steps=int(t.max_steps),
        batch_size=int(t.batch_size_per_worker * t.num_workers * t.grad_accum_steps),
        lr=float(t.lr),
        motion_lr_multiplier=float(t.motion_lr_multiplier),
        warmup_steps=int(t.warmup_steps),
        lr_schedule=str(t.lr_schedule),
        caption_dropout=float(t.caption_dropout),
        grad_clip=t.grad_clip,
        betas=tuple(t.betas),
        weight_decay=float(t.weight_decay),
        min_snr_gamma=t.min_snr_gamma,
        prediction_type=t.prediction_type,
        num_videos=32,
        # 20, not the demo's 30 DDIM steps: sampling is over half of the bench's cost (11 passes per seed).
        sample_steps=min(20, int(cfg.evaluate.sample_steps)),
        guidance=float(cfg.evaluate.guidance),
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ================================================================================================ the data
def prepare_data(cfg, out: Path, *, videos: int, evaluator_steps: int) -> tuple[str, str, dict]:
    """Synth -> preprocess -> evaluator, at the demo's settings; reused when ``out/data`` already holds the
    same request (a rerun of the bench skips straight to the arms)."""
    from pyoco import synth
    from pyoco.config import PreprocessConfig

    s, p, e = cfg.synth, cfg.preprocess, cfg.evaluator
    request = {
        "synth": {**s.model_dump(), "videos": videos, "out": None},
        "preprocess": {**p.model_dump(), "input": None, "output": None},
        "evaluator": {**e.model_dump(), "steps": evaluator_steps, "output": None},
    }
    data, evaluator_dir = out / "data", out / "evaluator"
    marker = out / "data-request.json"
    if marker.is_file():
        if json.loads(marker.read_text()) == json.loads(json.dumps(request)):
            meta = json.loads((evaluator_dir / "evaluator.json").read_text())
            return str(data), str(evaluator_dir), {"reused": True, "evaluator": meta}
        for made in (out / "raw", data, evaluator_dir):  # ours (the marker says so), for another request
            shutil.rmtree(made, ignore_errors=True)
        (out / "tasks.jsonl").unlink(missing_ok=True)  # results on the old data
        marker.unlink()
    elif data.exists() or evaluator_dir.exists():
        raise SystemExit(f"{out}: holds data/ or evaluator/ this bench did not write; use an empty --out")
    t0 = time.perf_counter()
    synth.write_dataset(
        str(out / "raw"),
        videos=videos,
        shards=s.shards,
        seed=cfg.seed,
        frames=s.frames,
        size=s.size,
        fps=s.fps,
    )
    t_synth = time.perf_counter() - t0
    pre = PreprocessConfig(**{**p.model_dump(), "input": str(out / "raw"), "output": str(data)})
    manifest = run_preprocess(pre, progress=False)
    t_pre = time.perf_counter() - t0 - t_synth
    meta = run_evaluator_train(
        str(data),
        str(evaluator_dir),
        labels=e.labels,
        steps=evaluator_steps,
        size=e.size,
        seed=e.seed,
        lr=e.lr,
    )
    marker.write_text(json.dumps(request))
    info = {
        "reused": False,
        "videos": videos,
        **{k: manifest.get(k) for k in ("inputs", "accepted_videos", "train_clips", "val_clips")},
        "synth_s": round(t_synth, 1),
        "preprocess_s": round(t_pre, 1),
        "evaluator_s": meta.get("seconds"),
        "evaluator": meta,
    }
    return str(data), str(evaluator_dir), info


def load_train_tensors(data: str):
    """uint8 frames (N, T, H, W, 3), caption states (N, L, D) float32 and mask (N, L) of clips/train,
    in clip-id order (the order does not depend on the file layout)."""
    from pyoco import clips as C

    table = C.read_clips(data, "train").sort_by("clip_id")
    rows = table.select(["frames", "num_frames", "height", "width"]).to_pylist()
    frames = np.stack([C.frames_array(r) for r in rows])
    cond, mask = C.embedding_arrays(table)
    return frames, cond, mask


# ============================================================================================ one arm's run
def finetune(model, scheduler_config, recipe: Recipe, prior, data, *, seed: int, text_encoder) -> list[float]:
    """``recipe.steps`` optimiser steps of the diffusion loss under ``prior``; returns the losses (under this
    prior: not comparable across arms).

    The batch order comes from its own generator (``seed``), so every arm of a seed sees the same batches;
    the noise, timesteps and caption dropout come from ``rank_generator(seed, 0)`` as in the trainer."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from pyoco.config import TrainConfig
    from pyoco.diffusion import DiffusionLoss
    from pyoco.noise import rank_generator

    frames, cond, mask = data
    model.set_trainable(recipe.train_layers)
    model.train()
    loss_fn = DiffusionLoss(
        scheduler_config,
        prediction_type=recipe.prediction_type,
        min_snr_gamma=recipe.min_snr_gamma,
        caption_dropout=recipe.caption_dropout,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, TrainConfig(lr=recipe.lr, motion_lr_multiplier=recipe.motion_lr_multiplier))
    opt = torch.optim.AdamW(
        groups, lr=recipe.lr, betas=recipe.betas, eps=ADAM_EPS, weight_decay=recipe.weight_decay
    )
    sched = LambdaLR(
        opt,
        lambda step: lr_multiplier(
            step, warmup_steps=recipe.warmup_steps, total_steps=recipe.steps, kind=recipe.lr_schedule
        ),
    )
    noise_gen = rank_generator(seed, 0)
    order_gen = torch.Generator().manual_seed(seed)
    null_cond, null_mask = text_encoder.null_embedding(1)
    n = len(frames)
    if n < recipe.batch_size:
        raise ValueError(f"{n} training clips is fewer than one batch of {recipe.batch_size}")
    order, pos, losses = torch.randperm(n, generator=order_gen), 0, []
    for _ in range(recipe.steps):
        if pos + recipe.batch_size > n:  # drop_last, reshuffle: one pass is one epoch
            order, pos = torch.randperm(n, generator=order_gen), 0
        idx = order[pos : pos + recipe.batch_size].numpy()
        pos += recipe.batch_size
        # uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1], as the trainer's collate does
        x0 = torch.from_numpy(frames[idx]).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
        out = loss_fn(
            model,
            x0,
            torch.from_numpy(cond[idx]),
            torch.from_numpy(mask[idx]),
            prior,
            generator=noise_gen,
            null_cond=null_cond,
            null_mask=null_mask,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def arm_scheduler_config(pretrained_sched: dict | None, recipe: Recipe, *, trained: bool) -> dict:
    """The scheduler config a task trains and samples with. A finetuned model predicts what the recipe
    trained it to (``prediction_type``, as ``pyoco train`` exports it): sampling a v-model as epsilon
    draws washed-out noise. The step-0 model is the image model as shipped, so it keeps its own type."""
    from pyoco.diffusion import make_scheduler_config

    return make_scheduler_config(
        pretrained_sched, prediction_type=recipe.prediction_type if trained else None
    )


def run_arm(
    arm: Arm | None, seed: int, sample_arms: list[Arm], recipe: Recipe, data: str, evaluator: str
) -> dict:
    """One task: build (and unless ``arm`` is None, the step-0 model, finetune) the video model for ``seed``,
    sample the val prompts under each of ``sample_arms``' priors, and score the videos with the evaluator.

    Returns per-video evaluator features, predicted classes and motion, so the driver can bootstrap over
    prompts; and the timings (wall and CPU seconds)."""
    import torch

    from pyoco.config import ModelConfig
    from pyoco.evaluator import load_evaluator
    from pyoco.metrics import frame_differences
    from pyoco.package import ModelPackage, PackageInfo
    from pyoco.text import load_text_encoder

    torch.set_num_threads(recipe.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model_cfg = ModelConfig(
        pretrained=recipe.pretrained,
        motion_num_attention_heads=recipe.motion_num_attention_heads,
        train_layers=recipe.train_layers,
        seed=seed,
    )
    model, pretrained_sched = build_denoiser(model_cfg, image_pretrain=False)
    scheduler_config = arm_scheduler_config(pretrained_sched, recipe, trained=arm is not None)
    clips = load_eval_clips(data, None, embed_dim=int(model.config.cross_attention_dim))
    text_spec = {"kind": "minilm", "max_length": int(clips.cond.shape[1])}
    info = PackageInfo(
        text_encoder=text_spec, height=int(clips.frames.shape[2]), width=int(clips.frames.shape[3])
    )
    losses: list[float] = []
    if arm is not None:
        losses = finetune(
            model,
            scheduler_config,
            recipe,
            arm.prior(),
            load_train_tensors(data),
            seed=seed,
            text_encoder=load_text_encoder(text_spec),
        )
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    package = ModelPackage(model, scheduler_config, info)
    ev = load_evaluator(evaluator)
    samples = {}
    for sample_arm in sample_arms:
        videos = generate_for_prompts(
            package,
            clips,
            sample_arm.prior(),
            num_videos=recipe.num_videos,
            steps=recipe.sample_steps,
            guidance=recipe.guidance,
            seed=seed,
        )
        feats, probs = ev.run(videos)
        samples[sample_arm.name] = {
            "features": feats.astype(np.float32).tolist(),
            "pred": {name: p.argmax(axis=1).tolist() for name, p in probs.items()},
            "motion": frame_differences(videos).numpy().tolist(),
        }
    return {
        "arm": STEP0 if arm is None else arm.name,
        "seed": seed,
        "samples": samples,
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-10:])) if losses else None,
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "num_videos": recipe.num_videos,
    }


def run_tasks(todo, results: list, log: Path, recipe: Recipe, data: str, evaluator: str, address) -> int:
    """Run the (key, arm, seed, sample arms) tasks as Ray tasks, appending each result to ``results`` and
    ``log`` as it finishes; returns how many run side by side (for the unloaded-time estimate)."""
    import ray

    cpus = os.cpu_count() or 1
    remote_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    own_ray = ensure_ray(address, log_to_driver=False, **({} if remote_cluster else {"num_cpus": cpus}))
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        slots = max(1, min(int(resources.get("CPU", 1)) // recipe.threads, len(todo)))
        # Fractional GPUs: these models are tiny, so 4 arms share one device.
        remote = ray.remote(num_cpus=recipe.threads, num_gpus=0.25 if gpus else 0)(run_arm)
        keys = {}
        for key, arm, seed, sample in todo:
            keys[remote.remote(arm, seed, sample, recipe, data, evaluator)] = key
        pending = list(keys)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            res = ray.get(done[0])
            results.append(res)
            with log.open("a") as f:
                f.write(json.dumps({"key": keys[done[0]], "result": res}) + "\n")
            print(
                f"ablation: {res['arm']} seed {res['seed']} done in {res['wall_s']} s "
                f"(train {res['train_wall_s']} s, cpu {res['cpu_s']} s); {len(pending)} left",
                flush=True,
            )
    finally:
        if own_ray:
            ray.shutdown()
    return slots


def task_key(arm: Arm | None, seed: int, sample_arms: list[Arm], recipe: Recipe, data: str) -> str:
    """What a task's result depends on (its data folder's request is fixed by data-request.json)."""
    return json.dumps(
        {
            "arm": None if arm is None else asdict(arm),
            "seed": seed,
            "sample": [asdict(a) for a in sample_arms],
            "recipe": asdict(recipe),
            "data": data,
        },
        sort_keys=True,
    )


# ============================================================================================== statistics
@dataclass
class Cell:
    """One (trained arm, sampling prior) cell over k seeds: per-seed, per-video arrays."""

    trained: str
    sampled: str
    seeds: list[int]
    hits: dict[str, np.ndarray]  # label -> (k, V) 0/1
    features: np.ndarray  # (k, V, D)
    motion: np.ndarray  # (k, V)

    @property
    def name(self) -> str:
        return f"{self.trained} | sampled {self.sampled}"


class Scorer:
    """The metrics of a cell on one (seed, prompt draw): accuracy per label, FVD and motion gap against the
    fixed real val clips (``pyoco.metrics``)."""

    def __init__(self, real_features: np.ndarray, real_motion: np.ndarray):
        from pyoco import metrics as M

        self.M = M
        self.mu, self.sigma = M.feature_statistics(real_features)
        self.real_motion = real_motion

    def fvd(self, feats: np.ndarray) -> float:
        mu, sigma = self.M.feature_statistics(feats.astype(np.float64))
        return float(self.M.frechet_distance(self.mu, self.sigma, mu, sigma))

    def values(self, cell: Cell, s: int, idx: np.ndarray | None) -> dict[str, float]:
        sel = slice(None) if idx is None else idx
        out = {f"acc_{k}": float(v[s][sel].mean()) for k, v in cell.hits.items()}
        out["fvd"] = self.fvd(cell.features[s][sel])
        out["motion_gap"] = self.M.wasserstein_1d(cell.motion[s][sel], self.real_motion)
        return out


def bootstrap_cells(cells: dict[str, Cell], scorer: Scorer, *, num_bootstrap: int, seed: int = 0):
    """{cell: {metric: (B,) values}}: a two-level bootstrap (seeds with replacement, then videos within each
    drawn seed), the same draw for every cell so differences between cells are paired."""
    rng = np.random.default_rng(seed)
    any_cell = next(iter(cells.values()))
    k, v = any_cell.motion.shape
    draws = []
    for _ in range(num_bootstrap):
        seeds = rng.integers(0, k, k)
        draws.append([(int(s), rng.integers(0, v, v)) for s in seeds])
    out = {}
    for name, cell in cells.items():
        per_metric: dict[str, list[float]] = {}
        for draw in draws:
            vals = [scorer.values(cell, s, idx) for s, idx in draw]
            for m in vals[0]:
                per_metric.setdefault(m, []).append(float(np.mean([x[m] for x in vals])))
        out[name] = {m: np.asarray(x) for m, x in per_metric.items()}
    return out


def ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def summarise(cells: dict[str, Cell], comparisons: list[dict], scorer: Scorer, *, num_bootstrap: int) -> dict:
    """Per cell: mean over seeds (each seed on all its videos) with bootstrap CI and the per-seed values.
    Per comparison (a - b): per-seed paired differences, their mean, bootstrap CI, SE and MDE."""
    boot = bootstrap_cells(cells, scorer, num_bootstrap=num_bootstrap)
    per_seed = {n: [scorer.values(c, s, None) for s in range(len(c.seeds))] for n, c in cells.items()}
    metrics = list(per_seed[next(iter(cells))][0])
    table = {}
    for name, cell in cells.items():
        row = {"trained": cell.trained, "sampled": cell.sampled, "seeds": cell.seeds, "metrics": {}}
        for m in metrics:
            vals = [x[m] for x in per_seed[name]]
            lo, hi = ci(boot[name][m])
            row["metrics"][m] = {"mean": float(np.mean(vals)), "ci_low": lo, "ci_high": hi, "per_seed": vals}
        table[name] = row
    comps = []
    for comp in comparisons:
        a, b = comp["a"], comp["b"]
        row = {**comp, "metrics": {}}
        for m in metrics:
            diffs = [x[m] - y[m] for x, y in zip(per_seed[a], per_seed[b], strict=True)]
            d = boot[a][m] - boot[b][m]
            lo, hi = ci(d)
            se = float(d.std(ddof=1))
            row["metrics"][m] = {
                "mean": float(np.mean(diffs)),
                "ci_low": lo,
                "ci_high": hi,
                "se": se,
                "mde": Z_MDE * se,
                "per_seed": diffs,
                "excludes_zero": bool(lo > 0 or hi < 0),
            }
        comps.append(row)
    return {"cells": table, "comparisons": comps, "metric_names": metrics}


def build_cells(
    results: list[dict], real_labels: list[dict], vocab: dict[str, list[str]], n_val: int
) -> dict[str, Cell]:
    """Group the tasks' samples into cells; a video's prompt is val clip ``i mod n_val``."""
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for res in results:
        for sampled, s in res["samples"].items():
            groups.setdefault((res["arm"], sampled), []).append((res["seed"], s))
    cells = {}
    for (trained, sampled), items in groups.items():
        items.sort(key=lambda x: x[0])
        v = len(items[0][1]["motion"])
        prompt_of = np.arange(v) % n_val
        hits = {}
        for label, classes in vocab.items():
            index = {c: j for j, c in enumerate(classes)}
            target = np.array([index.get(str(real_labels[p].get(label)), -1) for p in prompt_of])
            if (target < 0).any():
                continue
            hits[label] = np.stack([np.asarray(s["pred"][label]) == target for _, s in items]).astype(
                np.float64
            )
        cell = Cell(
            trained=trained,
            sampled=sampled,
            seeds=[seed for seed, _ in items],
            hits=hits,
            features=np.stack([np.asarray(s["features"], np.float64) for _, s in items]),
            motion=np.stack([np.asarray(s["motion"], np.float64) for _, s in items]),
        )
        cells[cell.name] = cell
    return cells


def design_comparisons(arms: list[Arm]) -> list[dict]:
    """The paired comparisons of the 2 x 2 design (a - b; each name says what it isolates)."""

    def cell(trained: str, sampled: str) -> str:
        return f"{trained} | sampled {sampled}"

    ref = cell(IID.name, IID.name)
    out = []
    for arm in arms:
        if arm is IID:
            continue
        out.append(
            {
                "name": f"{arm.name} vs iid (train + sample)",
                "effect": "total",
                "a": cell(arm.name, arm.name),
                "b": ref,
            }
        )
        out.append(
            {
                "name": f"{arm.name}: training effect (both sampled iid)",
                "effect": "training",
                "a": cell(arm.name, IID.name),
                "b": ref,
            }
        )
        out.append(
            {
                "name": f"{arm.name}: sampling effect (own vs iid sampling)",
                "effect": "sampling",
                "a": cell(arm.name, arm.name),
                "b": cell(arm.name, IID.name),
            }
        )
        out.append(
            {
                "name": f"step 0 sampled {arm.name} vs iid",
                "effect": "step0 sampling",
                "a": cell(STEP0, arm.name),
                "b": cell(STEP0, IID.name),
            }
        )
    mixed = [a for a in arms if a.kind == "mixed"]
    prog = [a for a in arms if a.kind == "progressive"]
    for m in mixed:
        for p in prog:
            if math.isclose(p.alpha, m.alpha):
                why = "equal alpha"
            elif math.isclose(p.rho, m.rho, rel_tol=1e-6):
                why = "matched rho"
            else:
                continue
            out.append(
                {
                    "name": f"{p.name} vs {m.name} ({why})",
                    "effect": why,
                    "a": cell(p.name, p.name),
                    "b": cell(m.name, m.name),
                }
            )
    return out


# ================================================================================================ reporting
def fmt(m: dict, digits: int = 3) -> str:
    return f"{m['mean']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def markdown(report: dict) -> str:
    s = report["summary"]
    acc_cols = [f"acc_{x}" for x in REPORTED_LABELS if f"acc_{x}" in s["metric_names"]]
    cols = acc_cols + ["fvd", "motion_gap"]
    lines = [
        f"Noise-prior ablation: {report['settings']['seeds']} seeds per arm, {report['recipe']['steps']} finetune "
        f"steps, {report['recipe']['num_videos']} val prompts per model, {report['recipe']['sample_steps']} DDIM "
        f"steps. Mean over seeds [95 % bootstrap CI over seeds, then prompts].",
        "",
        "| trained | sampled | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for row in s["cells"].values():
        lines.append(
            f"| {row['trained']} | {row['sampled']} | "
            + " | ".join(fmt(row["metrics"][c]) for c in cols)
            + " |"
        )
    ref = report["reference"]
    lines += [
        "",
        f"Real val clips: evaluator accuracy direction {ref['evaluator_accuracy'].get('direction')}, colour "
        f"{ref['evaluator_accuracy'].get('color')}; FVD of two halves of val {ref['fvd_real_halves']:.3f}; "
        f"chance direction {ref['chance'].get('direction', float('nan')):.3f}, colour {ref['chance'].get('color', float('nan')):.3f}.",
        "",
        "Paired differences (a - b, per seed, then averaged) [95 % CI]; MDE = smallest effect this run detects "
        "with 80 % power. Higher accuracy is better; lower FVD and motion gap are better.",
        "",
        "| comparison | " + " | ".join(f"Δ{c}" for c in cols) + " | MDE " + "/".join(cols) + " |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for comp in s["comparisons"]:
        ms = comp["metrics"]
        mark = ["*" if ms[c]["excludes_zero"] else "" for c in cols]
        lines.append(
            f"| {comp['name']} | "
            + " | ".join(
                f"{ms[c]['mean']:+.3f} [{ms[c]['ci_low']:+.3f}, {ms[c]['ci_high']:+.3f}]{mk}"
                for c, mk in zip(cols, mark, strict=True)
            )
            + " | "
            + " / ".join(f"{ms[c]['mde']:.3f}" for c in cols)
            + " |"
        )
    gate = report["gate"]
    lines += ["", "(* CI excludes 0.)", "", f"**Learnability gate:** {gate['verdict']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    cols = [c for c in (f"acc_{x}" for x in REPORTED_LABELS) if c in s["metric_names"]] + [
        "fvd",
        "motion_gap",
    ]
    rows = list(s["cells"].values())
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6), sharey=True)
    y = np.arange(len(rows))
    for ax, c in zip(np.atleast_1d(axes), cols, strict=True):
        means = np.array([r["metrics"][c]["mean"] for r in rows])
        lo = np.array([r["metrics"][c]["ci_low"] for r in rows])
        hi = np.array([r["metrics"][c]["ci_high"] for r in rows])
        colors = [
            "tab:gray"
            if r["trained"] == STEP0
            else ("tab:blue" if r["sampled"] == IID.name else "tab:orange")
            for r in rows
        ]
        # The interval itself, not errorbar's offsets from the mean: a percentile-bootstrap CI of a biased
        # statistic (FVD over resampled videos) can lie wholly above the point estimate.
        ax.hlines(y, lo, hi, colors="k", lw=1)
        ax.scatter(means, y, c=colors, zorder=3)
        for j, r in enumerate(rows):
            ax.scatter(
                r["metrics"][c]["per_seed"], [j] * len(r["metrics"][c]["per_seed"]), s=6, c="k", alpha=0.4
            )
        ax.set_title(c)
        ax.grid(alpha=0.3)
    ax0 = np.atleast_1d(axes)[0]
    ax0.set_yticks(y, [f"{r['trained']} | {r['sampled']}" for r in rows], fontsize=7)
    fig.suptitle(
        "trained arm | sampling prior  (blue: sampled iid, orange: own prior, grey: step 0)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def machine() -> dict:
    import torch

    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
    except OSError:
        cpu = platform.processor()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
    }


# ===================================================================================================== main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Output folder (data, evaluator, ablation.{json,md,png}).")
    ap.add_argument("--config", default=str(RECIPE_CONFIG), help="Workflow YAML whose recipe the arms use.")
    ap.add_argument("--seeds", type=int, default=5, help="Seeds per arm (k).")
    ap.add_argument("--alpha", type=float, default=1.0, help="alpha of the mixed and progressive arms.")
    ap.add_argument("--steps", type=int, help="Finetune steps (default: the config's train.max_steps).")
    ap.add_argument("--videos", type=int, help="Synth videos (default: the config's synth.videos).")
    ap.add_argument("--num-videos", type=int, help="Generated videos per model and prior (default 32).")
    ap.add_argument(
        "--sample-steps",
        type=int,
        help="DDIM steps (default: 20, or the config's evaluate.sample_steps if fewer).",
    )
    ap.add_argument("--evaluator-steps", type=int, help="Evaluator training steps (default: the config's).")
    ap.add_argument("--bootstrap", type=int, help="Bootstrap draws (default 300; --quick 30).")
    ap.add_argument(
        "--ray-address", help="Ray cluster to run the arms on (default: $RAY_ADDRESS or embedded)."
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: iid and mixed, 1 seed, 48 videos, 3 steps, 8 prompts.",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    from pyoco.config import load_config

    t_start = time.perf_counter()
    cfg = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        arms = make_arms(args.alpha, matched_rho=False, kinds=("mixed",))
        seeds = 1
        defaults = {
            "steps": 3,
            "videos": 48,
            "num_videos": 8,
            "sample_steps": 3,
            "evaluator_steps": 20,
            "bootstrap": 30,
        }
    else:
        arms = make_arms(args.alpha)
        seeds = args.seeds
        defaults = {"videos": cfg.synth.videos, "evaluator_steps": cfg.evaluator.steps, "bootstrap": 300}
    pick = {
        k: getattr(args, k) if getattr(args, k, None) is not None else defaults.get(k)
        for k in ("steps", "videos", "num_videos", "sample_steps", "evaluator_steps")
    }
    num_bootstrap = args.bootstrap or defaults["bootstrap"]
    recipe = demo_recipe(
        cfg, steps=pick["steps"], num_videos=pick["num_videos"], sample_steps=pick["sample_steps"]
    )

    # Preprocess starts (and stops) its own embedded Ray when there is none; Ray for the arms is started
    # only when some task has not finished yet, so recomputing the statistics needs no Ray.
    data, evaluator, data_info = prepare_data(
        cfg, out, videos=pick["videos"], evaluator_steps=pick["evaluator_steps"]
    )
    t_data = time.perf_counter() - t_start
    # Every finished task is appended to tasks.jsonl at once: a rerun with the same recipe skips it
    # (an interrupted bench resumes, or a smaller --seeds reuses the first seeds' tasks).
    log = out / "tasks.jsonl"
    done_before = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done_before[row["key"]] = row["result"]
    results, todo = [], []
    for seed in range(seeds):
        for arm in [*arms, None]:
            sample = arms if arm is None else ([arm] if arm is IID else [arm, IID])
            key = task_key(arm, seed, sample, recipe, data)
            if key in done_before:
                results.append(done_before[key])
            else:
                todo.append((key, arm, seed, sample))
    if results:
        print(f"ablation: {len(results)} tasks reused from {log}", flush=True)
    slots = max(1, min((os.cpu_count() or 1) // recipe.threads, seeds * (len(arms) + 1)))
    if todo:
        slots = run_tasks(todo, results, log, recipe, data, evaluator, args.ray_address)
    t_arms = time.perf_counter() - t_start - t_data

    from pyoco import metrics as M
    from pyoco.evaluator import load_evaluator

    clips = load_eval_clips(data, None, embed_dim=384)
    ev = load_evaluator(evaluator)
    real_feats, real_probs = ev.run(clips.frames)
    real_motion = M.frame_differences(clips.frames).numpy().astype(np.float64)
    n_val = len(clips.clip_ids)
    cells = build_cells(results, clips.labels, ev.labels, n_val)
    order = [f"{a.name} | sampled {a.name}" for a in arms] + [
        f"{a.name} | sampled {IID.name}" for a in arms if a is not IID
    ]
    order += [f"{STEP0} | sampled {a.name}" for a in arms]
    cells = {n: cells[n] for n in order}
    scorer = Scorer(real_feats.astype(np.float64), real_motion)
    summary = summarise(cells, design_comparisons(arms), scorer, num_bootstrap=num_bootstrap)

    iid_dir = summary["cells"][f"{IID.name} | sampled {IID.name}"]["metrics"].get("acc_direction")
    informative = iid_dir is not None and iid_dir["mean"] >= GATE_DIRECTION_ACCURACY
    verdict = (
        f"iid direction accuracy {iid_dir['mean']:.3f} >= {GATE_DIRECTION_ACCURACY}: the comparison is informative."
        if informative
        else f"iid direction accuracy {iid_dir['mean'] if iid_dir else float('nan'):.3f} < {GATE_DIRECTION_ACCURACY}: "
        "the iid arm did not learn motion at this budget, so this comparison is NOT informative at this budget."
    )
    halves = (np.arange(n_val) % 2 == 0, np.arange(n_val) % 2 == 1)
    real_acc = {}
    for name, classes in ev.labels.items():
        index = {c: j for j, c in enumerate(classes)}
        target = np.array([index.get(str(lab.get(name)), -1) for lab in clips.labels])
        real_acc[name] = round(float((real_probs[name].argmax(1) == target)[target >= 0].mean()), 3)
    cpu_total = sum(r["cpu_s"] for r in results)
    report = {
        "settings": {
            "seeds": seeds,
            "quick": bool(args.quick),
            "arms": [{**asdict(a), "rho": a.rho} for a in arms],
            "bootstrap": num_bootstrap,
            "synth_videos": pick["videos"],
            "evaluator_steps": pick["evaluator_steps"],
            "config": str(args.config),
        },
        "recipe": asdict(recipe),
        "data": {k: v for k, v in data_info.items() if k != "evaluator"} | {"val_clips": n_val},
        "reference": {
            "evaluator_accuracy": real_acc,
            "evaluator_heldout_accuracy": data_info["evaluator"].get("heldout_accuracy"),
            "chance": {n: 1.0 / len(c) for n, c in ev.labels.items()},
            "fvd_real_halves": M.frechet_distance_features(real_feats[halves[0]], real_feats[halves[1]]),
            "motion_gap_real_halves": M.wasserstein_1d(real_motion[halves[0]], real_motion[halves[1]]),
            "motion_mean_real": float(real_motion.mean()),
        },
        "summary": summary,
        "gate": {
            "metric": "acc_direction of iid | sampled iid",
            "threshold": GATE_DIRECTION_ACCURACY,
            "value": None if iid_dir is None else iid_dir["mean"],
            "informative": bool(informative),
            "verdict": verdict,
        },
        "tasks": [{k: v for k, v in r.items() if k != "samples"} for r in results],
        "timing": {
            "data_s": round(t_data, 1),
            "arms_s": round(t_arms, 1),
            "total_s": round(time.perf_counter() - t_start, 1),
            "task_cpu_s": round(cpu_total, 1),
            "parallel_slots": slots,
            "unloaded_estimate_arms_s": round(cpu_total / slots, 1),
            "note": "task CPU seconds / parallel slots: the arms' wall time on an otherwise idle machine",
        },
        "machine": machine(),
        "reproduce": "PYTHONPATH=. .venv/bin/python bench/ablation.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "ablation.md").write_text(md)
    plot(report, out / "ablation.png")
    print(md)
    t = report["timing"]
    print(
        f"machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, load {report['machine']['load_avg']}, "
        f"torch {report['machine']['torch']}; wall {t['total_s']} s (data {t['data_s']} s, arms {t['arms_s']} s; "
        f"unloaded estimate of the arms {t['unloaded_estimate_arms_s']} s)"
    )
    print(f"reproduce: {report['reproduce']}")
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return report


if __name__ == "__main__":
    main()
