"""``pyoco evaluate``: metrics of one model on the held-out split ``DATA/clips/val``.

    run_evaluate("out/model", "out/data", EvaluateConfig(evaluator="out/evaluator")) -> results dict

Evaluate reads only the val clips (pyoco.clips); they are taken in ``clip_id`` order (clip ids are content
hashes, so the order does not depend on the file layout).

Generated videos. ``num_videos`` videos (default: as many as there are val clips, at least 64); video i
is prompted with the caption of val clip ``i mod n_val`` (its stored caption states, so the prompt's
labels are that clip's labels), sampled by ``pyoco.sampling.sample_video`` under the model's own prior
with the noise stream ``clip_generators(seed, [i])``: a video does not depend on the batch it was drawn
in, and the same model + data + seed give the same videos (DDIM, eta = 0).

Metrics (``results["metrics"]``, also logged to MLflow as ``eval.<name>``):

- ``fvd``: Fréchet distance between the evaluator's features of all val clips and of the generated videos,
  with a percentile-bootstrap 95 % CI (``fvd_ci_low``/``fvd_ci_high``) and ``fvd_num_videos``. Refused below
  32 generated videos. ``fvd_real_halves`` (the two halves of val against each other) is the reference
  a perfect model would approach (it is biased upwards by the small halves).
- ``prompt_accuracy_<label>``: share of generated videos whose evaluator prediction equals the label of
  the prompt's val clip, for every label the evaluator knows, with a Wilson 95 % CI.
- ``inception_score_<label>``: exp(E KL(p(y|x) || p(y))) of the evaluator's class probabilities on the
  generated videos, per label (1 .. number of classes), with a bootstrap CI. The Inception-Score form,
  per label, not one combined number.
- ``motion_gap``: 1-D Wasserstein distance between the per-clip mean |frame difference| of generated and
  real val clips (bootstrap CI); ``motion_gap_real_halves`` is the reference. A frozen video scores the real
  clips' mean motion. ``motion_mean_generated``/``motion_mean_real`` are descriptive only (mean |Δframe|
  is not a quality score: a frozen video has the lowest).
- ``val_loss``: the diffusion loss on the first ``num_clips`` val clips *under the model's own prior*
  (every clip its own noise stream, one draw eps reused at every timestep of the grid; x_t =
  sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; unweighted MSE to the eps/v target). Its irreducible part depends
  on the prior's covariance, so it does not compare models trained with different priors.

Without an evaluator, ``fvd``, prompt accuracy and the class score are reported as skipped, never as
numbers; ``motion_gap`` and ``val_loss`` need none.

Layouts: parquet ``frames`` are uint8 (T, H, W, 3) bytes -> model input float (B, 3, T, H, W) in [-1, 1];
``caption_embedding`` (L*D floats, or (D,) pooled = L 1) -> (B, L, D) float32 with ``caption_mask`` (B, L).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pyoco.config import EvaluateConfig, ModelConfig, NoiseConfig

METRIC_DESCRIPTIONS = {
    "val_loss": "diffusion loss on val clips under the model's own prior (not comparable across priors)",
    "fvd": "Fréchet distance of evaluator features, val clips vs generated videos (lower is better)",
    "motion_gap": "W1 distance of per-clip mean |frame difference|, generated vs val (lower is better)",
    "prompt_accuracy_<label>": "share of generated videos the evaluator labels as their prompt (higher is better)",
    "inception_score_<label>": "exp(E KL(p(y|x) || p(y))) of the evaluator on generated videos (higher is better)",
    "motion_mean_generated": "mean |frame difference| of generated videos: descriptive, not a quality score",
}


# ---------------------------------------------------------------------------------------------- the data
@dataclass
class EvalClips:
    clip_ids: list[str]
    captions: list[str]
    frames: Any  # uint8 (N, T, H, W, 3) numpy
    cond: Any  # float32 (N, L, D) numpy
    mask: Any  # bool (N, L) numpy
    labels: list[dict] = field(default_factory=list)  # parsed labels per clip ({} when none)
    pooled: bool = False  # L = 1 pooled caption vectors (no caption_mask column)

    def subset(self, n: int) -> EvalClips:
        return EvalClips(
            self.clip_ids[:n],
            self.captions[:n],
            self.frames[:n],
            self.cond[:n],
            self.mask[:n],
            self.labels[:n],
            self.pooled,
        )


def clip_stream_id(clip_id: str) -> int:
    """A stable integer per clip id for ``clip_generators`` (hex ids are used directly)."""
    try:
        return int(clip_id[:15], 16)
    except ValueError:
        return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:7], "little")


def _embedding_rows(column, embed_dim: int, source: str):
    """(N, L, D) float32 from a fixed-size or variable list column of L*D (or D, pooled) floats."""
    import numpy as np

    rows = column.to_pylist()
    out = []
    for i, row in enumerate(rows):
        if row is None:
            raise PyocoError(f"{source}: caption_embedding is empty in row {i}")
        arr = np.asarray(row, dtype=np.float32)
        if arr.size % embed_dim:
            raise PyocoError(
                f"{source}: caption_embedding has {arr.size} values, not a multiple of the model's "
                f"cross-attention width {embed_dim}"
            )
        out.append(arr.reshape(-1, embed_dim))
    lengths = {a.shape[0] for a in out}
    if len(lengths) > 1:
        raise PyocoError(f"{source}: caption_embedding lengths differ between rows ({sorted(lengths)})")
    return np.stack(out) if out else np.zeros((0, 1, embed_dim), np.float32)


def load_eval_clips(data: str, num_clips: int | None, *, embed_dim: int) -> EvalClips:
    """The first ``num_clips`` (None: all) clips by clip_id of the held-out split ``data``/clips/val
    (local or s3://): evaluate never reads the training clips."""
    import numpy as np

    from pyoco import clips as C

    source = C.split_uri(data, "val")
    try:
        table = C.read_clips(data, "val", limit=num_clips).sort_by("clip_id")
        labels = C.labels_of(table)
    except C.DataError as err:
        raise PyocoError(str(err)) from None
    missing = {"clip_id", "frames", "num_frames", "height", "width", C.EMBEDDING} - set(table.column_names)
    if missing:
        raise PyocoError(f"{source}: missing columns {sorted(missing)}")
    if len(table) == 0:
        raise PyocoError(f"{source}: no clips")
    emb = _embedding_rows(table.column(C.EMBEDDING), embed_dim, source)
    pooled = C.MASK not in table.column_names
    if pooled:
        mask = np.ones(emb.shape[:2], dtype=bool)
    else:
        mask = np.asarray(table.column(C.MASK).to_pylist(), dtype=bool).reshape(len(table), -1)
    if mask.shape != emb.shape[:2]:
        raise PyocoError(f"{source}: caption_mask shape {mask.shape} != embedding {emb.shape[:2]}")
    cols = ["clip_id", "frames", "num_frames", "height", "width"]
    rows = table.select(cols + (["caption"] if "caption" in table.column_names else [])).to_pylist()
    shapes = {(r["num_frames"], r["height"], r["width"]) for r in rows}
    if len(shapes) != 1:
        raise PyocoError(f"{source}: clips differ in (frames, height, width): {sorted(shapes)}")
    return EvalClips(
        clip_ids=[r["clip_id"] for r in rows],
        captions=[r.get("caption") or "" for r in rows],
        frames=np.stack([C.frames_array(r) for r in rows]),
        cond=emb,
        mask=mask,
        labels=labels,
        pooled=pooled and emb.shape[1] == 1,
    )


# ---------------------------------------------------------------------------------------------- the loss
def validation_loss(
    package,
    clips: EvalClips,
    prior,
    *,
    timesteps: list[int],
    seed: int,
    batch_size: int = 4,
) -> dict[int, float]:
    """{t: mean over clips of the unweighted prediction MSE at timestep t} (see the module docstring)."""
    import torch

    from pyoco.diffusion import DiffusionLoss
    from pyoco.noise import clip_generators

    loss_fn = DiffusionLoss(package.scheduler_config or None)
    bad = [t for t in timesteps if not 0 <= int(t) < loss_fn.num_train_timesteps]
    if bad:
        raise PyocoError(f"evaluate.timesteps {bad} outside [0, {loss_fn.num_train_timesteps})")
    model = package.denoiser.eval()
    sums = {int(t): 0.0 for t in timesteps}
    n = len(clips.clip_ids)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            # uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]
            x0 = torch.from_numpy(clips.frames[sl]).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
            if package.vae is not None:
                from pyoco.model import encode_video

                x0 = encode_video(package.vae, x0)
            cond = torch.from_numpy(clips.cond[sl]).float()
            mask = torch.from_numpy(clips.mask[sl])
            gens = clip_generators(seed, [clip_stream_id(c) for c in clips.clip_ids[sl]])
            eps = prior.sample(x0.shape, generator=gens, dtype=x0.dtype)
            for t in sums:
                tt = torch.full((x0.shape[0],), t, dtype=torch.long)
                x_t, target = loss_fn.noisy(x0, eps, tt)
                pred = model(x_t, tt, cond, mask)
                per_clip = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3, 4))
                sums[t] += float(per_clip.double().sum())
    return {t: s / n for t, s in sums.items()}


# ------------------------------------------------------------------------------------------- sampling
def _null_embedding(package, clips: EvalClips):
    """The unconditional caption states for guidance, in the clips' layout (as training computes them)."""
    import numpy as np

    from pyoco.text import load_text_encoder

    length, dim = clips.cond.shape[1], clips.cond.shape[2]
    spec = dict(package.info.text_encoder)
    enc = load_text_encoder(spec) if clips.pooled else load_text_encoder(spec, max_length=length)
    if enc.dim != dim:
        raise PyocoError(
            f"the model's text encoder gives {enc.dim}-d states but the val clips' caption_embedding is {dim}-d"
        )
    if clips.pooled:
        null = enc.pooled([""])[:, None, :]
        return np.asarray(null, np.float32), np.ones((1, 1), dtype=bool)
    null, null_mask = enc.null_embedding(1)
    return null.numpy().astype(np.float32), null_mask.numpy().astype(bool)


def generate_for_prompts(
    package,
    clips: EvalClips,
    prior,
    *,
    num_videos: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 16,
    progress=None,
):
    """uint8 (num_videos, T, H, W, 3): video i prompted with val clip ``i mod n``'s caption states and
    drawn from the stream ``clip_generators(seed, [i])`` (see the module docstring)."""
    import numpy as np
    import torch

    from pyoco.noise import clip_generators
    from pyoco.sampling import sample_video

    n, num_frames, height, width = clips.frames.shape[:4]
    null = _null_embedding(package, clips) if guidance != 1.0 else (None, None)
    model = package.denoiser.eval()
    channels = int(getattr(model, "config", {}).get("in_channels", 3)) if package.vae is None else 3
    out = []
    for start in range(0, num_videos, batch_size):
        idx = list(range(start, min(start + batch_size, num_videos)))
        src = [i % n for i in idx]
        videos = sample_video(
            model,
            torch.from_numpy(clips.cond[src]).float(),
            torch.from_numpy(clips.mask[src]),
            prior=prior,
            null_cond=None if null[0] is None else torch.from_numpy(null[0]),
            null_mask=None if null[1] is None else torch.from_numpy(null[1]),
            num_frames=num_frames,
            height=height,
            width=width,
            channels=channels,
            steps=steps,
            guidance=guidance,
            generator=clip_generators(seed, idx),
            scheduler_config=package.scheduler_config,
            vae=package.vae,
        )
        out.append(videos.numpy())
        if progress is not None:
            progress(idx[-1] + 1, num_videos)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------- metrics
def sample_metrics(
    real,
    generated,
    prompt_of,
    real_labels: list[dict],
    evaluator=None,
    *,
    num_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The sample metrics of the module docstring for uint8 real val clips (N, T, H, W, 3) and generated
    videos (M, ...), video j prompted with val clip ``prompt_of[j]``. Returns
    {"metrics": flat numbers, "fvd": ..., "prompt_accuracy": ..., "inception_score": ..., "motion": ...}."""
    import numpy as np

    from pyoco import metrics as M

    halves = (np.arange(len(real)) % 2 == 0, np.arange(len(real)) % 2 == 1)
    motion_real = M.frame_differences(real).numpy()
    motion_gen = M.frame_differences(generated).numpy()
    gap = M.wasserstein_1d(motion_gen, motion_real)
    gap_lo, gap_hi = M.bootstrap_ci(
        M.wasserstein_1d, (motion_gen, motion_real), num_bootstrap=num_bootstrap, seed=seed
    )
    motion = {
        "motion_gap": gap,
        "motion_gap_ci_low": gap_lo,
        "motion_gap_ci_high": gap_hi,
        "motion_gap_real_halves": M.wasserstein_1d(motion_real[halves[0]], motion_real[halves[1]])
        if len(real) >= 2
        else None,
        "motion_mean_generated": float(motion_gen.mean()),
        "motion_mean_real": float(motion_real.mean()),
    }
    flat: dict[str, float] = {k: v for k, v in motion.items() if v is not None}
    out: dict[str, Any] = {"motion": motion}
    if evaluator is None:
        reason = "no evaluator given (--evaluator PATH)"
        out["fvd"] = {"status": "skipped", "reason": reason}
        out["prompt_accuracy"] = {"status": "skipped", "reason": reason}
        out["inception_score"] = {"status": "skipped", "reason": reason}
        out["metrics"] = flat
        return out

    feats_real, probs_real = evaluator.run(real)
    feats_gen, probs_gen = evaluator.run(generated)
    fvd = M.fvd_from_features(feats_real, feats_gen, num_bootstrap=num_bootstrap, seed=seed)
    fvd_halves = (
        M.frechet_distance_features(feats_real[halves[0]], feats_real[halves[1]]) if len(real) >= 4 else None
    )
    out["fvd"] = {
        "status": "computed",
        "value": fvd["fvd"],
        "ci_low": fvd["fvd_ci_low"],
        "ci_high": fvd["fvd_ci_high"],
        "num_generated": fvd["num_videos"],
        "num_real": int(len(real)),
        "real_halves": fvd_halves,
        "evaluator": evaluator.path,
        "evaluator_train_data_hash": evaluator.meta.get("train_data_hash"),
    }
    flat.update(
        fvd=fvd["fvd"],
        fvd_ci_low=fvd["fvd_ci_low"],
        fvd_ci_high=fvd["fvd_ci_high"],
        fvd_num_videos=len(feats_gen),
    )
    if fvd_halves is not None:
        flat["fvd_real_halves"] = fvd_halves
    accuracy: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for name, classes in evaluator.labels.items():
        index = {c: k for k, c in enumerate(classes)}
        target = np.array([index.get(str(real_labels[p].get(name)), -1) for p in prompt_of])
        keep = target >= 0
        pred = probs_gen[name].argmax(axis=1)
        hits, counted = int((pred[keep] == target[keep]).sum()), int(keep.sum())
        real_target = np.array([index.get(str(lab.get(name)), -1) for lab in real_labels])
        real_keep = real_target >= 0
        real_hits = int((probs_real[name].argmax(axis=1)[real_keep] == real_target[real_keep]).sum())
        if counted:
            lo, hi = M.wilson_interval(hits, counted)
            acc = hits / counted
            flat.update(
                {
                    f"prompt_accuracy_{name}": acc,
                    f"prompt_accuracy_{name}_ci_low": lo,
                    f"prompt_accuracy_{name}_ci_high": hi,
                }
            )
            accuracy[name] = {"value": acc, "ci_low": lo, "ci_high": hi, "videos": counted}
        else:
            accuracy[name] = {"value": None, "videos": 0, "reason": f"no val prompt has a known {name!r}"}
        accuracy[name].update(
            chance=1.0 / len(classes),
            evaluator_accuracy_on_real=real_hits / int(real_keep.sum()) if real_keep.any() else None,
        )
        score = M.class_score(probs_gen[name])
        s_lo, s_hi = M.bootstrap_ci(M.class_score, (probs_gen[name],), num_bootstrap=num_bootstrap, seed=seed)
        flat.update(
            {
                f"inception_score_{name}": score,
                f"inception_score_{name}_ci_low": s_lo,
                f"inception_score_{name}_ci_high": s_hi,
            }
        )
        scores[name] = {
            "value": score,
            "ci_low": s_lo,
            "ci_high": s_hi,
            "real": M.class_score(probs_real[name]),
            "max": len(classes),
        }
    out["prompt_accuracy"] = accuracy
    out["inception_score"] = scores
    out["metrics"] = flat
    return out


# ---------------------------------------------------------------------------------------------- the step
def resolve_num_videos(cfg: EvaluateConfig, num_val: int) -> int:
    """``evaluate.num_videos``, default max(val clips, 64)."""
    return int(cfg.num_videos) if cfg.num_videos is not None else max(num_val, 64)


def run_evaluate(
    checkpoint: str,
    data: str,
    cfg: EvaluateConfig,
    *,
    model_cfg: ModelConfig | None = None,
    noise: NoiseConfig | None = None,
    mlflow_run_id: str | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "pyoco",
    batch_size: int = 4,
    progress=None,
) -> dict[str, Any]:
    """Evaluate the model package ``checkpoint`` on the val split of preprocess output ``data``.

    ``noise`` overrides the package's prior (None: the prior the model was trained with). Results go to
    ``cfg.output`` (JSON) when set, and to MLflow: into ``mlflow_run_id`` (e.g. the training run) as
    metrics ``eval.*`` and the artifact ``evaluate/results.json``, or into a new run named ``evaluate``
    when no run id is given (``log_to_mlflow=False`` skips MLflow). ``batch_size`` is the val_loss batch;
    sampling batches ``cfg.sample_batch_size`` videos.
    """
    import numpy as np
    import torch

    from pyoco import metrics as M
    from pyoco.evaluator import load_evaluator
    from pyoco.noise import make_prior
    from pyoco.package import load_package

    t0 = time.perf_counter()
    if cfg.evaluator is not None and cfg.num_videos is not None and cfg.num_videos < M.MIN_FVD_VIDEOS:
        raise PyocoError(
            f"evaluate.num_videos = {cfg.num_videos}: FVD needs at least {M.MIN_FVD_VIDEOS} generated videos"
        )
    evaluator = load_evaluator(cfg.evaluator) if cfg.evaluator else None
    package = load_package(checkpoint, cache_dir=model_cfg.cache_dir if model_cfg else None)
    prior = make_prior(noise.kind, noise.alpha) if noise is not None else package.prior()
    embed_dim = int(package.denoiser.config.cross_attention_dim)
    clips = load_eval_clips(data, None, embed_dim=embed_dim)
    n, num_frames, height, width = clips.frames.shape[:4]
    if package.denoiser.max_num_frames is not None and num_frames > package.denoiser.max_num_frames:
        raise PyocoError(
            f"{data}: clips have {num_frames} frames; the model takes at most "
            f"{package.denoiser.max_num_frames}"
        )
    num_videos = resolve_num_videos(cfg, n)

    torch.manual_seed(0)  # nothing below should draw from the global RNG; pin it anyway
    loss_clips = clips.subset(cfg.num_clips)
    per_t = validation_loss(
        package, loss_clips, prior, timesteps=list(cfg.timesteps), seed=cfg.seed, batch_size=batch_size
    )
    val_loss = float(np.mean(list(per_t.values())))
    loss_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    generated = generate_for_prompts(
        package,
        clips,
        prior,
        num_videos=num_videos,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        batch_size=cfg.sample_batch_size,
        progress=progress,
    )
    sample_seconds = time.perf_counter() - t1
    prompt_of = [i % n for i in range(num_videos)]
    try:
        sm = sample_metrics(
            clips.frames,
            generated,
            prompt_of,
            clips.labels,
            evaluator,
            num_bootstrap=cfg.num_bootstrap,
            seed=cfg.seed,
        )
    except (RuntimeError, ValueError) as err:  # TorchScript errors are RuntimeErrors, many lines long
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PyocoError(
            f"{cfg.evaluator}: evaluator failed on videos (N, 3, T={num_frames}, H={height}, W={width}): "
            f"{first[:300]}"
        ) from None

    flat = {
        "val_loss": val_loss,
        **{f"val_loss_t{t:04d}": v for t, v in per_t.items()},
        **sm["metrics"],
        "num_videos": float(num_videos),
    }
    from pipelines.tracking import pyoco_version, redact_uri
    from pyoco.clips import eval_data_hash

    results: dict[str, Any] = {
        "checkpoint": redact_uri(str(checkpoint)),
        "data": redact_uri(str(data)),
        # which clips these numbers are about: the registry refuses to compare different ones
        "eval_data_hash": eval_data_hash(data),
        "evaluate_config": cfg.model_dump(mode="json", exclude={"output"}),
        "split": "val",
        "num_val_clips": int(n),
        "num_clips": int(len(loss_clips.clip_ids)),
        "clip_shape": [int(num_frames), int(height), int(width), 3],
        "seed": cfg.seed,
        "noise": prior.describe(),
        "prediction_type": package.scheduler_config.get("prediction_type", "epsilon")
        if package.scheduler_config
        else "epsilon",
        "timesteps": [int(t) for t in per_t],
        "val_loss": val_loss,
        # The irreducible error depends on the prior's covariance: val_loss of models trained with different
        # priors is not comparable (the promotion gate uses a sample metric when an evaluator is configured).
        "val_loss_under": "the model's own prior"
        if prior.describe() == package.prior().describe()
        else "a prior other than the model's own",
        "val_loss_note": "under the model's own prior: not comparable between models with different priors",
        "val_loss_per_timestep": {str(t): v for t, v in per_t.items()},
        "sample": {
            "num_videos": int(num_videos),
            "prompts": "val clip captions in clip_id order, cycled",
            "steps": cfg.sample_steps,
            "guidance": cfg.guidance,
            "batch_size": cfg.sample_batch_size,
        },
        "motion": sm["motion"],
        "fvd": sm["fvd"],
        "prompt_accuracy": sm["prompt_accuracy"],
        "inception_score": sm["inception_score"],
        "metrics": flat,
        "metric_descriptions": METRIC_DESCRIPTIONS,
        "pyoco_version": pyoco_version(),
        "seconds": {
            "loss": round(loss_seconds, 3),
            "sample": round(sample_seconds, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    if log_to_mlflow:
        results["mlflow_run_id"] = _log_to_mlflow(results, mlflow_run_id, tracking_uri, experiment)
    if cfg.output:
        _write_json(cfg.output, results)
    return results


def _write_json(uri: str, results: dict) -> None:
    from pyoco.storage import filesystem

    fs, path = filesystem(uri)
    if "://" not in uri or uri.startswith("file://"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


def _log_to_mlflow(results: dict, run_id: str | None, tracking_uri: str | None, experiment: str) -> str:
    import mlflow

    from pipelines import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
    created = run_id is None
    if created:
        run_id = tracking.start_run(
            uri, experiment, run_name="evaluate", tags={tracking.TAG_KIND: "evaluate"}
        )
    tracking.log_metrics(uri, run_id, {f"eval.{k}": v for k, v in results["metrics"].items()}, step=0)
    tracking.set_tags(
        uri,
        run_id,
        {
            "pyoco.eval.fvd": results["fvd"]["status"],
            "pyoco.eval_data_hash": str(results.get("eval_data_hash") or "unknown"),
        },
    )
    tracking.log_text(uri, run_id, json.dumps(results, indent=2, sort_keys=True), "evaluate/results.json")
    if created:
        tracking.end_run(uri, run_id)
    return run_id


# ------------------------------------------------------------------------------------------------- CLI
@cli_errors
def evaluate_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Model package folder (local or s3://)."),
    data: str = typer.Option(..., "--data", help="Preprocess output folder (evaluate reads clips/val)."),
    num_clips: int | None = typer.Option(None, "--num-clips", min=1, help="Val clips for val_loss."),
    num_videos: int | None = typer.Option(
        None, "--num-videos", min=1, help="Generated videos (default: val clips, at least 64)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Noise seed (fixed per clip and per video)."),
    config: Path | None = typer.Option(None, "--config", help="pyoco config; its evaluate: section is used."),
    evaluator: Path | None = typer.Option(
        None,
        "--evaluator",
        "--fvd-extractor",
        help="TorchScript evaluator (`pyoco evaluator train` output, or an I3D export) for FVD/accuracy.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the results JSON here."),
    mlflow_run: str | None = typer.Option(
        None, "--mlflow-run", help="Log into this MLflow run (default: a new run)."
    ),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log to MLflow."),
) -> None:
    """FVD, prompt accuracy and class score (with an evaluator), motion gap and val_loss on the val split."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pyoco.config import load_config

    overrides = {
        "evaluate.num_clips": num_clips,
        "evaluate.num_videos": num_videos,
        "evaluate.seed": seed,
        "evaluate.evaluator": str(evaluator) if evaluator else None,
        "evaluate.output": str(out) if out else None,
    }
    cfg = load_config(config, overrides)
    # The bar starts with the first sampled batch, so input errors stay one line.
    bar = Progress(
        TextColumn("evaluate: sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("videos", total=total)
        bar.update(task, completed=done)

    try:
        results = run_evaluate(
            checkpoint,
            data,
            cfg.evaluate,
            model_cfg=cfg.model,
            noise=None,
            mlflow_run_id=mlflow_run,
            log_to_mlflow=not no_mlflow,
            tracking_uri=cfg.mlflow.tracking_uri,
            experiment=cfg.mlflow.experiment,
            progress=progress,
        )
    finally:
        bar.stop()
    for line in summary_lines(results):
        console.print(line)
    print(json.dumps(results["metrics"], sort_keys=True))


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable lines: FVD, prompt accuracy, class score and motion gap with CIs, then val_loss."""
    lines = []
    fvd = results["fvd"]
    if fvd["status"] == "computed":
        ref = f"; real-vs-real halves {fvd['real_halves']:.3f}" if fvd.get("real_halves") is not None else ""
        lines.append(
            f"FVD {fvd['value']:.3f} [95% CI {fvd['ci_low']:.3f}, {fvd['ci_high']:.3f}] over "
            f"{fvd['num_generated']} generated vs {fvd['num_real']} val clips{ref}"
        )
    else:
        lines.append(f"FVD: skipped ({fvd['reason']})")
    if results["prompt_accuracy"].get("status") != "skipped":
        for name, acc in results["prompt_accuracy"].items():
            if acc.get("value") is None:
                lines.append(f"prompt accuracy {name}: n/a ({acc['reason']})")
                continue
            score = results["inception_score"][name]
            lines.append(
                f"prompt accuracy {name}: {acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] "
                f"(chance {acc['chance']:.3f}; evaluator on real val {acc['evaluator_accuracy_on_real']:.3f}); "
                f"class score {score['value']:.2f} [{score['ci_low']:.2f}, {score['ci_high']:.2f}] of {score['max']}"
            )
    m = results["motion"]
    lines.append(
        f"motion gap {m['motion_gap']:.4f} [{m['motion_gap_ci_low']:.4f}, {m['motion_gap_ci_high']:.4f}] "
        f"(mean |Δframe| generated {m['motion_mean_generated']:.4f}, real {m['motion_mean_real']:.4f})"
    )
    per_t = ", ".join(f"t={t}: {v:.5f}" for t, v in results["val_loss_per_timestep"].items())
    lines.append(f"val_loss {results['val_loss']:.6f} under the model's own prior ({per_t})")
    return lines


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
