"""``pyoco evaluate``: metrics of one model on the held-out split ``DATA/clips/val``.

    run_evaluate("out/model", "out/data", EvaluateConfig(evaluator="out/evaluator")) -> results dict

Evaluate reads only the val clips (pyoco.clips); they are taken in ``clip_id`` order (clip ids are content
hashes, so the order does not depend on the file layout).

Generated videos. ``num_videos`` videos (default: as many as there are val clips, at least 64); video i
is prompted with the caption of val clip ``i mod n_val`` (its stored caption states, so the prompt's
labels are that clip's labels), sampled by ``pyoco.sampling.sample_video`` under the model's own prior
with the noise stream ``clip_generators(seed, [i])``: a video does not depend on the batch it was drawn
in, and the same model + data + seed give the same videos (DDIM; with ``eta`` > 0 its step noise comes
from the same per-video stream).

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

import json
import time
from pathlib import Path
from typing import Any

from pipelines.common import PyocoError
from pipelines.evaluate.metrics import (
    METRIC_DESCRIPTIONS,
    decode_real_clips,
    generate_for_prompts,
    load_eval_clips,
    sample_metrics,
    validation_loss,
)
from pyoco.config import EvaluateConfig, ModelConfig, NoiseConfig


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
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Evaluate the model package ``checkpoint`` on the val split of preprocess output ``data``.

    ``noise`` overrides the package's prior (None: the prior the model was trained with). Results go to
    ``cfg.output`` (JSON) when set, and to MLflow: into ``mlflow_run_id`` (e.g. the training run) as
    metrics ``eval.*`` and the artifact ``evaluate/results.json``, or into a new run named ``evaluate``
    when no run id is given (``log_to_mlflow=False`` skips MLflow). ``batch_size`` is the val_loss batch;
    sampling batches ``cfg.sample_batch_size`` videos.

    ``cfg.use_gpu``: the loss, sampling and scoring (:func:`evaluate_model`) run in a one-GPU Ray task
    (:mod:`pipelines.gpu`; Ray at ``ray_address``, the session's, or embedded), with one line when the
    cluster has no GPU; this process still writes the results and logs them to MLflow. Otherwise they run
    here, on the CPU.
    """
    from pyoco import metrics as M

    if cfg.evaluator is not None and cfg.num_videos is not None and cfg.num_videos < M.MIN_FVD_VIDEOS:
        raise PyocoError(
            f"evaluate.num_videos = {cfg.num_videos}: FVD needs at least {M.MIN_FVD_VIDEOS} generated videos"
        )
    cache_dir = model_cfg.cache_dir if model_cfg else None
    if cfg.use_gpu:
        from pipelines.gpu import run_on_gpu

        results = run_on_gpu(
            evaluate_model,
            checkpoint,
            data,
            cfg,
            setting="evaluate.use_gpu",
            address=ray_address,
            cache_dir=cache_dir,
            noise=noise,
            batch_size=batch_size,
        )
    else:
        results = evaluate_model(
            checkpoint, data, cfg, cache_dir=cache_dir, noise=noise, batch_size=batch_size, progress=progress
        )
    if log_to_mlflow:
        results["mlflow_run_id"] = _log_to_mlflow(results, mlflow_run_id, tracking_uri, experiment)
    if cfg.output:
        _write_json(cfg.output, results)
    return results


def evaluate_model(
    checkpoint: str,
    data: str,
    cfg: EvaluateConfig,
    *,
    cache_dir: str | None = None,
    noise: NoiseConfig | None = None,
    batch_size: int = 4,
    progress=None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The results of :func:`run_evaluate` (loss, samples, scores), computed on ``device``; nothing is
    logged or written."""
    import numpy as np
    import torch

    from pyoco import clips as C
    from pyoco.evaluator import load_evaluator
    from pyoco.noise import make_prior
    from pyoco.package import load_package

    t0 = time.perf_counter()
    evaluator = load_evaluator(cfg.evaluator) if cfg.evaluator else None
    package = load_package(checkpoint, cache_dir=cache_dir, device=device)
    prior = make_prior(noise.kind, noise.alpha) if noise is not None else package.prior()
    embed_dim = int(package.denoiser.config.cross_attention_dim)
    clips = load_eval_clips(data, None, embed_dim=embed_dim)
    real_source = "stored frames" if clips.frames is not None else "latents decoded by the model's VAE"
    clips = decode_real_clips(package, clips, C.split_uri(data, "val"))
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
        package,
        loss_clips,
        prior,
        timesteps=list(cfg.timesteps),
        seed=cfg.seed,
        batch_size=batch_size,
        device=device,
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
        eta=cfg.eta,
        batch_size=cfg.sample_batch_size,
        progress=progress,
        device=device,
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
        "real_clips": real_source,  # what FVD and the motion gap compare the generated videos with
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
            "eta": cfg.eta,
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
        "device": str(device),
    }
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
